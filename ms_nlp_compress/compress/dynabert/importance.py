"""First-order Taylor importance of attention heads and FFN neurons (DynaBERT, after Michel et al. 2019).

A unit's importance is the expected change of the loss when the unit is removed, approximated to first order by
|dL/d gate| where the gate multiplies the unit's output (gate = 1 in the trained model). Heads get an explicit gate
(the head mask); for FFN neurons the gate gradient is rebuilt from the weight gradients the training step already
has (see ffn_importance). Compute these on a held-out slice of the TRAINING data (project decision: the reference
used the dev set, which then also selects the model).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Tuple

import numpy as np
import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from ms_nlp_compress.compress.quant.primitives import validate_finite
from ms_nlp_compress.train.losses import cross_entropy


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


# ---------------------------------------------------------------- whole model ------------------------------------
@dataclass
class Importance:
    """Scores of one model: heads[l] (num_heads of layer l,) and neurons[l] (FFN size of layer l,), float64."""

    heads: Tuple[np.ndarray, ...]
    neurons: Tuple[np.ndarray, ...]
    batches: int = 0


class _MaskedTaskLoss(nn.Cell):
    """The fine-tuned model's own task loss with a head mask: cross-entropy, or MSE for a regression head."""

    def __init__(self, model: nn.Cell):
        super().__init__(auto_prefix=False)  # no renaming of the model's Parameters
        self.model = model
        self.regression = model.num_labels == 1

    def construct(self, head_mask, input_ids, attention_mask, token_type_ids, labels):
        logits = self.model(input_ids, attention_mask, token_type_ids, head_mask)[0]  # (B, C)
        if self.regression:
            error = logits.astype(ms.float32).reshape(-1) - labels.astype(ms.float32)
            return (error * error).mean()
        return cross_entropy(logits, labels)


class _ImportanceGradients(nn.Cell):
    """One compiled graph per batch shape: |dL/d head_mask| and every layer's FFN neuron scores."""

    def __init__(self, model: nn.Cell, ffn_cells):
        super().__init__(auto_prefix=False)
        self.loss = _MaskedTaskLoss(model)
        weights = []
        for ffn in ffn_cells:
            weights += [ffn.intermediate.weight, ffn.intermediate.bias, ffn.output.weight]
        self.weights = ParameterTuple(weights)
        self.grad_fn = ms.grad(self.loss, grad_position=0, weights=self.weights)
        self.num_layers = len(ffn_cells)

    def construct(self, head_mask, input_ids, attention_mask, token_type_ids, labels):
        head_grad, weight_grads = self.grad_fn(head_mask, input_ids, attention_mask, token_type_ids, labels)
        scores = ()
        for layer in range(self.num_layers):
            w1, b1, w2 = self.weights[3 * layer], self.weights[3 * layer + 1], self.weights[3 * layer + 2]
            g_w1, g_b1, g_w2 = weight_grads[3 * layer], weight_grads[3 * layer + 1], weight_grads[3 * layer + 2]
            scores = scores + (ffn_importance(w1, b1, g_w1, g_b1, w2, g_w2),)
        return ops.abs(head_grad), scores


class ImportanceScorer:
    """Head and FFN-neuron importance of a `NezhaForSequenceClassification` under its task loss.

    `scorer(batches)` sums, over batches of (input_ids, attention_mask, token_type_ids, labels), the per-batch
    |dL/d head_mask| and `ffn_importance`; the model runs in eval mode (no dropout: deterministic scores). The
    gradient graph is compiled once (in graph mode) and reused by later calls, e.g. to score the rewired model.
    Feed it a held-out slice of the TRAINING data (`held_out_rows`). `reduce`, when given, maps each summed numpy
    array to its sum over data-parallel ranks (e.g. an AllReduce), so every rank rewires identically.
    """

    def __init__(self, model: nn.Cell, reduce: Optional[Callable[[np.ndarray], np.ndarray]] = None):
        layers = list(model.bert.encoder.layers)
        self.model = model
        self.layer_heads = tuple(layer.num_heads for layer in layers)
        self.gradients = _ImportanceGradients(model, [layer.ffn for layer in layers])
        self.reduce = reduce

    def __call__(self, batches: Iterable) -> Importance:
        self.model.set_train(False)
        num_layers, max_heads = len(self.layer_heads), max(self.layer_heads)
        head_mask = Tensor(np.ones((num_layers, max_heads), np.float32))
        heads = np.zeros((num_layers, max_heads), np.float64)
        neurons = None
        count = 0
        for index, batch in enumerate(batches):
            head_grad, scores = self.gradients(head_mask, *batch)
            head_grad = head_grad.asnumpy()
            validate_finite(f"head-mask gradient of importance batch {index}", head_grad)
            scores = [score.asnumpy().astype(np.float64) for score in scores]
            for layer, score in enumerate(scores):
                validate_finite(f"FFN importance of layer {layer} in importance batch {index}", score)
            heads += head_grad
            neurons = scores if neurons is None else [total + score for total, score in zip(neurons, scores)]
            count += 1
        if count == 0:
            raise ValueError("importance: no batches (is the held-out slice empty?)")
        if self.reduce is not None:
            heads = self.reduce(heads)
            neurons = [self.reduce(score) for score in neurons]
        return Importance(tuple(heads[layer, :n].copy() for layer, n in enumerate(self.layer_heads)),
                          tuple(neurons), count)


def held_out_rows(num_rows: int, count: int, seed: int) -> Tuple[np.ndarray, np.ndarray]:
    """(importance rows, remaining rows) of a training set: a seeded random `count` rows scored for importance
    (instead of the dev set, which would then also select the model), and the rest, both sorted."""
    if num_rows < 1:
        raise ValueError(f"importance: the training set is empty (num_rows={num_rows})")
    if count < 1:
        raise ValueError(f"dynabert.importance_examples must be >= 1, got {count}")
    count = min(count, num_rows)
    chosen = np.sort(np.random.default_rng(seed).choice(num_rows, size=count, replace=False))
    rest = np.setdiff1d(np.arange(num_rows), chosen)
    return chosen, rest
