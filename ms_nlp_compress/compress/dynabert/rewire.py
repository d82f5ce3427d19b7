"""Network rewiring: reorder heads and FFN neurons so the most important come first (DynaBERT).

After rewiring, a width-w sub-network is the LEADING slice of every matrix, so "keep the k best heads" is a slice.
The permutation is exact: the attention output is a sum over heads and the FFN output a sum over neurons, and both
sums are order-independent, so reordering Q/K/V rows (per head block) together with attention-output columns, and
FFN-in rows together with FFN-out columns, leaves the layer's function unchanged. Biases of the output denses are
untouched (they are added after the sum). NEZHA's relative-position table is shared by all heads, so it is unaffected.

All functions act on numpy arrays in MindSpore nn.Dense layout, weight shape (out_features, in_features), and
return new arrays (inputs are not modified).
"""
from __future__ import annotations

from typing import Tuple

import numpy as np
from mindspore import Tensor

from ms_nlp_compress.compress.quant.primitives import validate_finite


def order_by_importance(scores) -> np.ndarray:
    """Indices sorting `scores` descending along the last axis; ties keep the original order (stable).

    1-D scores give one order; 2-D (layers, units) give one order per layer. NaN/inf scores raise ValueError.
    """
    scores = np.asarray(scores)
    if scores.ndim not in (1, 2) or scores.shape[-1] == 0:
        raise ValueError(f"order_by_importance: scores must be 1-D or 2-D and non-empty, got shape {scores.shape}")
    validate_finite("importance scores", scores)
    # Stable sort of the negated scores = descending order with ties in index order.
    return np.argsort(-scores.astype(np.float64), axis=-1, kind="stable")


def _check_permutation(order, size: int, what: str) -> np.ndarray:
    order = np.asarray(order)
    if order.ndim != 1 or order.dtype.kind not in "iu":
        raise ValueError(f"{what}: order must be a 1-D integer array, got dtype {order.dtype} shape {order.shape}")
    if order.shape[0] != size or not np.array_equal(np.sort(order), np.arange(size)):
        raise ValueError(f"{what}: order must be a permutation of 0..{size - 1}, got {order.tolist()}")
    return order.astype(np.int64)


def head_row_indices(order, head_dim: int) -> np.ndarray:
    """Row (or column) indices that move whole head blocks: head order[j] goes to block j. (heads*head_dim,)"""
    order = np.asarray(order, dtype=np.int64)
    return (order[:, None] * head_dim + np.arange(head_dim)[None, :]).reshape(-1)  # (heads, head_dim) -> flat


def permute_heads(q_w, q_b, k_w, k_b, v_w, v_b, out_w, order, head_dim: int) -> Tuple[np.ndarray, ...]:
    """Reorder attention heads: returns (q_w, q_b, k_w, k_b, v_w, v_b, out_w), new head j = old head order[j].

    Shapes: q_w/k_w/v_w (heads*head_dim, hidden), biases (heads*head_dim,), out_w (hidden, heads*head_dim).
    head_dim is explicit because DynaBERT sub-networks keep 64-wide heads with heads*head_dim != hidden.
    """
    if isinstance(head_dim, bool) or not isinstance(head_dim, (int, np.integer)) or head_dim < 1:
        raise ValueError(f"permute_heads: head_dim must be a positive integer, got {head_dim!r}")
    q_w, k_w, v_w, out_w = (np.asarray(a) for a in (q_w, k_w, v_w, out_w))
    q_b, k_b, v_b = (np.asarray(a) for a in (q_b, k_b, v_b))
    projected = q_w.shape[0]
    if q_w.ndim != 2 or projected % head_dim:
        raise ValueError(f"permute_heads: q_w shape {q_w.shape} must be (heads*head_dim, hidden) with head_dim "
                         f"{head_dim}")
    for name, weight in (("k_w", k_w), ("v_w", v_w)):
        if weight.shape != q_w.shape:
            raise ValueError(f"permute_heads: {name} has shape {weight.shape}, expected {q_w.shape} like q_w")
    for name, bias in (("q_b", q_b), ("k_b", k_b), ("v_b", v_b)):
        if bias.shape != (projected,):
            raise ValueError(f"permute_heads: {name} has shape {bias.shape}, expected ({projected},)")
    if out_w.ndim != 2 or out_w.shape[1] != projected:
        raise ValueError(f"permute_heads: out_w has shape {out_w.shape}, expected (hidden, {projected}) "
                         "(nn.Dense layout: its input columns are the concatenated heads)")
    order = _check_permutation(order, projected // head_dim, "permute_heads")
    rows = head_row_indices(order, head_dim)
    return (q_w[rows], q_b[rows], k_w[rows], k_b[rows], v_w[rows], v_b[rows], out_w[:, rows])


def permute_ffn(in_w, in_b, out_w, order) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reorder FFN neurons: returns (in_w, in_b, out_w), new neuron j = old neuron order[j].

    Shapes: in_w (ffn, hidden), in_b (ffn,), out_w (hidden, ffn).
    """
    in_w, in_b, out_w = np.asarray(in_w), np.asarray(in_b), np.asarray(out_w)
    if in_w.ndim != 2:
        raise ValueError(f"permute_ffn: in_w must be (ffn, hidden), got shape {in_w.shape}")
    ffn_size = in_w.shape[0]
    if in_b.shape != (ffn_size,):
        raise ValueError(f"permute_ffn: in_b has shape {in_b.shape}, expected ({ffn_size},)")
    if out_w.ndim != 2 or out_w.shape[1] != ffn_size:
        raise ValueError(f"permute_ffn: out_w has shape {out_w.shape}, expected (hidden, {ffn_size})")
    order = _check_permutation(order, ffn_size, "permute_ffn")
    return in_w[order], in_b[order], out_w[:, order]


def rewire_model(model, head_scores, neuron_scores) -> Tuple[Tuple[np.ndarray, ...], Tuple[np.ndarray, ...]]:
    """Rewire a `NezhaForSequenceClassification` (or `NezhaModel`) in place: in every layer, heads and FFN neurons
    sorted by descending importance (stable), so width w keeps the most important ones as leading slices.

    head_scores[l] / neuron_scores[l]: the layer's scores (an `Importance`'s heads / neurons). Every new array is
    computed and checked before any Parameter is assigned. Returns (head orders, neuron orders) per layer: new unit
    j of layer l is old unit order[l][j]. Parameter objects and names are kept (set_data), so optimizers, sub-networks
    and checkpoints built on the model stay valid.
    """
    backbone = model.bert if hasattr(model, "bert") else model
    layers = list(backbone.encoder.layers)
    if len(head_scores) != len(layers) or len(neuron_scores) != len(layers):
        raise ValueError(f"rewire_model: {len(head_scores)} head and {len(neuron_scores)} neuron score lists for a "
                         f"{len(layers)}-layer model")
    head_dim = backbone.config.attention_head_size
    updates, head_orders, neuron_orders = [], [], []
    for index, layer in enumerate(layers):
        attention = layer.attention.self_attention
        dense = [attention.query, attention.key, attention.value]
        output = layer.attention.output.dense
        if np.shape(head_scores[index]) != (layer.num_heads,):
            raise ValueError(f"rewire_model: layer {index} has {layer.num_heads} heads but its head scores have "
                             f"shape {np.shape(head_scores[index])}")
        head_order = order_by_importance(np.asarray(head_scores[index]))
        arrays = []
        for cell in dense:
            arrays += [cell.weight.asnumpy(), cell.bias.asnumpy()]
        permuted = permute_heads(*arrays, output.weight.asnumpy(), head_order, head_dim)
        params = []
        for cell in dense:
            params += [cell.weight, cell.bias]
        updates += list(zip(params + [output.weight], permuted))
        ffn = layer.ffn
        if np.shape(neuron_scores[index]) != (ffn.intermediate.weight.shape[0],):
            raise ValueError(f"rewire_model: layer {index} has {ffn.intermediate.weight.shape[0]} FFN neurons but "
                             f"its neuron scores have shape {np.shape(neuron_scores[index])}")
        neuron_order = order_by_importance(np.asarray(neuron_scores[index]))
        permuted = permute_ffn(ffn.intermediate.weight.asnumpy(), ffn.intermediate.bias.asnumpy(),
                               ffn.output.weight.asnumpy(), neuron_order)
        updates += list(zip([ffn.intermediate.weight, ffn.intermediate.bias, ffn.output.weight], permuted))
        head_orders.append(head_order)
        neuron_orders.append(neuron_order)
    for param, value in updates:  # every permutation built and checked: assign
        param.set_data(Tensor(np.ascontiguousarray(value), dtype=param.dtype))
    return tuple(head_orders), tuple(neuron_orders)
