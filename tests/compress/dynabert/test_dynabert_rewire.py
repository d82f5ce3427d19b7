"""Rewiring is exact: a random attention + FFN layer computes the same function before and after permutation."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_nlp_compress.compress.dynabert.rewire import (head_row_indices, order_by_importance, permute_ffn,
                                                      permute_heads)

HIDDEN, HEADS, HEAD_DIM, FFN = 8, 4, 3, 10  # heads * head_dim = 12 != hidden on purpose (DynaBERT sub-networks)


def random_layer(seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    shapes = {"q_w": (HEADS * HEAD_DIM, HIDDEN), "q_b": (HEADS * HEAD_DIM,), "k_w": (HEADS * HEAD_DIM, HIDDEN),
              "k_b": (HEADS * HEAD_DIM,), "v_w": (HEADS * HEAD_DIM, HIDDEN), "v_b": (HEADS * HEAD_DIM,),
              "out_w": (HIDDEN, HEADS * HEAD_DIM), "out_b": (HIDDEN,), "in_w": (FFN, HIDDEN), "in_b": (FFN,),
              "ffn_out_w": (HIDDEN, FFN), "ffn_out_b": (HIDDEN,)}
    return {name: (rng.standard_normal(shape) * 0.4).astype(dtype) for name, shape in shapes.items()}


def twin_layer(p, x, mask):
    """Numpy layer in nn.Dense layout (y = x W^T + b): attention with additive mask, residual, tanh-GELU FFN."""
    batch, length, _ = x.shape

    def heads(t):
        return t.reshape(batch, length, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)  # (B, H, L, d)

    q, k, v = (heads(x @ p[f"{n}_w"].T + p[f"{n}_b"]) for n in "qkv")
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM) + mask[:, None, None, :]  # (B, H, L, L)
    probabilities = np.exp(scores - scores.max(-1, keepdims=True))
    probabilities /= probabilities.sum(-1, keepdims=True)
    context = (probabilities @ v).transpose(0, 2, 1, 3).reshape(batch, length, HEADS * HEAD_DIM)  # (B, L, H*d)
    attended = x + context @ p["out_w"].T + p["out_b"]
    inner = attended @ p["in_w"].T + p["in_b"]
    activated = 0.5 * inner * (1 + np.tanh(0.7978845608 * (inner + 0.044715 * inner ** 3)))
    return attended + activated @ p["ffn_out_w"].T + p["ffn_out_b"]


def rewired(p, head_order, neuron_order):
    q_w, q_b, k_w, k_b, v_w, v_b, out_w = permute_heads(p["q_w"], p["q_b"], p["k_w"], p["k_b"], p["v_w"], p["v_b"],
                                                        p["out_w"], head_order, HEAD_DIM)
    in_w, in_b, ffn_out_w = permute_ffn(p["in_w"], p["in_b"], p["ffn_out_w"], neuron_order)
    return dict(p, q_w=q_w, q_b=q_b, k_w=k_w, k_b=k_b, v_w=v_w, v_b=v_b, out_w=out_w, in_w=in_w, in_b=in_b,
                ffn_out_w=ffn_out_w)


def test_rewired_layer_is_exact_in_float64():
    rng = np.random.default_rng(1)
    layer = random_layer()
    originals = {name: value.copy() for name, value in layer.items()}
    x = rng.standard_normal((2, 5, HIDDEN))
    mask = np.array([[0, 0, 0, -10000.0, -10000.0], [0, 0, 0, 0, 0]])
    head_order = order_by_importance(rng.random(HEADS))
    neuron_order = order_by_importance(rng.random(FFN))
    assert not np.array_equal(head_order, np.arange(HEADS)) and not np.array_equal(neuron_order, np.arange(FFN))
    np.testing.assert_allclose(twin_layer(rewired(layer, head_order, neuron_order), x, mask),
                               twin_layer(layer, x, mask), rtol=0, atol=1e-12)
    for name, value in layer.items():  # inputs untouched
        np.testing.assert_array_equal(value, originals[name])


def test_rewiring_moves_whole_blocks_so_leading_slices_keep_the_best():
    layer = random_layer(2)
    scores = np.array([0.1, 0.9, 0.5, 0.7])
    order = order_by_importance(scores)
    np.testing.assert_array_equal(order, [1, 3, 2, 0])
    new = rewired(layer, order, np.arange(FFN))
    for new_head, old_head in enumerate(order):
        old_rows = slice(old_head * HEAD_DIM, (old_head + 1) * HEAD_DIM)
        new_rows = slice(new_head * HEAD_DIM, (new_head + 1) * HEAD_DIM)
        for name in ("q_w", "k_w", "v_w", "q_b", "k_b", "v_b"):
            np.testing.assert_array_equal(new[name][new_rows], layer[name][old_rows])
        np.testing.assert_array_equal(new["out_w"][:, new_rows], layer["out_w"][:, old_rows])
    np.testing.assert_array_equal(head_row_indices([1, 0], 2), [2, 3, 0, 1])


class MindSporeLayer(nn.Cell):
    """The same layer with MindSpore nn.Dense (weight (out, in)), loaded from a parameter dict."""

    def __init__(self, p):
        super().__init__()

        def dense(weight, bias):
            layer = nn.Dense(weight.shape[1], weight.shape[0])
            layer.weight.set_data(Tensor(weight.astype(np.float32)))
            layer.bias.set_data(Tensor(bias.astype(np.float32)))
            return layer

        self.query, self.key, self.value = (dense(p[f"{n}_w"], p[f"{n}_b"]) for n in "qkv")
        self.attention_output = dense(p["out_w"], p["out_b"])
        self.intermediate = dense(p["in_w"], p["in_b"])
        self.output = dense(p["ffn_out_w"], p["ffn_out_b"])

    def construct(self, x):
        batch, length, _ = x.shape
        q = self.query(x).reshape(batch, length, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)  # (B, H, L, d)
        k = self.key(x).reshape(batch, length, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
        v = self.value(x).reshape(batch, length, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
        probabilities = ops.softmax(ops.matmul(q, k.transpose(0, 1, 3, 2)) / (HEAD_DIM ** 0.5), -1)
        context = ops.matmul(probabilities, v).transpose(0, 2, 1, 3).reshape(batch, length, -1)  # (B, L, H*d)
        attended = x + self.attention_output(context)
        return attended + self.output(ops.tanh(self.intermediate(attended)))


def test_rewired_mindspore_layer_in_graph_mode():
    layer = random_layer(3, np.float32)
    x = Tensor(np.random.default_rng(4).standard_normal((2, 5, HIDDEN)).astype(np.float32))
    head_order, neuron_order = np.array([2, 0, 3, 1]), np.random.default_rng(5).permutation(FFN)
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        before = MindSporeLayer(layer)(x).asnumpy()
        after = MindSporeLayer(rewired(layer, head_order, neuron_order))(x).asnumpy()
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)


def test_order_by_importance_is_descending_and_stable():
    np.testing.assert_array_equal(order_by_importance([1.0, 3.0, 3.0, 0.0, 3.0]), [1, 2, 4, 0, 3])
    np.testing.assert_array_equal(order_by_importance(np.zeros(4)), [0, 1, 2, 3])  # all ties: identity
    np.testing.assert_array_equal(order_by_importance([[0.1, 0.2], [0.4, 0.3]]), [[1, 0], [0, 1]])
    np.testing.assert_array_equal(order_by_importance([5.0]), [0])
    np.testing.assert_array_equal(order_by_importance([1e30, -1e30, 1.0]), [0, 2, 1])
    with pytest.raises(ValueError, match="importance scores contains 1 NaN"):
        order_by_importance([0.1, np.nan])
    with pytest.raises(ValueError, match="1-D or 2-D"):
        order_by_importance(np.zeros((2, 2, 2)))


def test_permutations_are_validated():
    layer = random_layer()
    args = [layer[n] for n in ("q_w", "q_b", "k_w", "k_b", "v_w", "v_b", "out_w")]
    with pytest.raises(ValueError, match=r"permutation of 0\.\.3"):
        permute_heads(*args, order=[0, 1, 1, 2], head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="permutation"):
        permute_heads(*args, order=[0, 1, 2], head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="integer array"):
        permute_heads(*args, order=np.array([0.0, 1.0, 2.0, 3.0]), head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="head_dim"):
        permute_heads(*args, order=[0, 1, 2, 3], head_dim=5)
    with pytest.raises(ValueError, match="out_w has shape"):
        permute_heads(*args[:-1], layer["out_w"].T, order=[0, 1, 2, 3], head_dim=HEAD_DIM)
    with pytest.raises(ValueError, match="in_b has shape"):
        permute_ffn(layer["in_w"], layer["in_b"][:-1], layer["ffn_out_w"], np.arange(FFN))
    with pytest.raises(ValueError, match=r"permutation of 0\.\.9"):
        permute_ffn(layer["in_w"], layer["in_b"], layer["ffn_out_w"], np.arange(1, FFN + 1))
