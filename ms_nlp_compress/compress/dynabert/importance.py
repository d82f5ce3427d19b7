"""First-order Taylor importance of attention heads and FFN neurons (DynaBERT, after Michel et al. 2019).

A unit's importance is the expected change of the loss when the unit is removed, approximated to first order by
|dL/d gate| where the gate multiplies the unit's output (gate = 1 in the trained model). Heads get an explicit gate
(the head mask); for FFN neurons the gate gradient is rebuilt from the weight gradients the training step already
has (see ffn_importance). Compute these on a held-out slice of the TRAINING data (project decision: the reference
used the dev set, which then also selects the model).
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ms_nlp_compress.compress.quant.primitives import validate_finite


def head_importance(loss_fn: Callable, batches: Iterable, num_layers: int, num_heads: int,
                    use_jit: bool = True) -> np.ndarray:
    """Sum over batches of |dL/d head_mask|, shape (num_layers, num_heads), float64 numpy.

    loss_fn(head_mask, *batch) -> scalar loss, where head_mask is a float32 (num_layers, num_heads) tensor of ones
    that the model multiplies into each head's attention probabilities (equivalently its context output). Run the
    model in eval mode (no dropout) so the scores are deterministic. `batch` items are passed positionally (a tuple
    or list is unpacked; anything else is passed as the single argument).

    Deliberate deviation from the reference DynaBERT code: the reference never zeroes the mask gradient between
    batches, so each accumulated term is |running sum of gradients|, and gradients of opposite sign cancel. This
    function sums |per-batch gradient|, the score of Michel et al. that the reference meant to compute.
    use_jit compiles the gradient function once (much faster for real models; loss_fn must be graph-compatible).
    NaN or inf gradients raise ValueError naming the batch.
    """
    for name, value in (("num_layers", num_layers), ("num_heads", num_heads)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"head_importance: {name} must be a positive integer, got {value!r}")
    gradient_fn = ms.grad(loss_fn, grad_position=0)
    if use_jit:
        gradient_fn = ms.jit(gradient_fn)
    head_mask = Tensor(np.ones((num_layers, num_heads), np.float32))
    importance = np.zeros((num_layers, num_heads), np.float64)
    batch_count = 0
    for batch_index, batch in enumerate(batches):
        arguments = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        gradient = gradient_fn(head_mask, *arguments).asnumpy()
        if gradient.shape != importance.shape:
            raise ValueError(f"head_importance: gradient of the head mask has shape {gradient.shape}, expected "
                             f"{importance.shape}; does loss_fn use the mask?")
        validate_finite(f"head-mask gradient of batch {batch_index}", gradient)
        importance += np.abs(gradient.astype(np.float64))
        batch_count += 1
    if batch_count == 0:
        raise ValueError("head_importance: batches is empty")
    return importance


def ffn_importance(intermediate_weight, intermediate_bias, intermediate_weight_grad, intermediate_bias_grad,
                   output_weight, output_weight_grad):
    """Per-neuron FFN importance of one layer (algorithms.md 3.3), shape (ffn_size,). Graph-safe, MindSpore tensors.

    Dense layout (MindSpore nn.Dense and PyTorch Linear agree): intermediate (FFN-in) weight W1 is
    (ffn_size, hidden) so neuron n is ROW n, with bias b1 (ffn_size,); output (FFN-out) weight W2 is
    (hidden, ffn_size) so neuron n is COLUMN n.
        score[n] = |sum_k W1[n,k] dL/dW1[n,k] + b1[n] dL/db1[n]| + |sum_k W2[k,n] dL/dW2[k,n]|
    The first term is dL/d(gate on neuron n's pre-activation), the second dL/d(gate on its activation): both are
    first-order Taylor estimates of removing the neuron. Accumulate over batches by summing (per-batch gradients,
    not running sums; see head_importance). Finite input assumed: check host-side with validate_finite.
    """
    ffn_size, hidden_size = intermediate_weight.shape
    expected = {
        "intermediate_bias": (intermediate_bias, (ffn_size,)),
        "intermediate_weight_grad": (intermediate_weight_grad, (ffn_size, hidden_size)),
        "intermediate_bias_grad": (intermediate_bias_grad, (ffn_size,)),
        "output_weight_grad": (output_weight_grad, tuple(output_weight.shape)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"ffn_importance: {name} has shape {tuple(tensor.shape)}, expected {shape}")
    if tuple(output_weight.shape)[1:] != (ffn_size,):
        raise ValueError(f"ffn_importance: output_weight has shape {tuple(output_weight.shape)}, expected "
                         f"(hidden, {ffn_size}) (nn.Dense layout: columns are FFN neurons)")
    pre_activation_term = (intermediate_weight * intermediate_weight_grad).sum(axis=1) \
        + intermediate_bias * intermediate_bias_grad  # (ffn_size,)
    activation_term = (output_weight * output_weight_grad).sum(axis=0)  # (ffn_size,)
    return ops.abs(pre_activation_term) + ops.abs(activation_term)
