"""Head and FFN-neuron importance: MindSpore gradients against a numpy finite-difference twin and against the
first-order Taylor meaning of the scores."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, ops

from ms_nlp_compress.compress.dynabert.importance import ffn_importance, head_importance

LAYERS, HEADS, HEAD_DIM, HIDDEN, SEQUENCE, BATCH = 2, 3, 2, 4, 3, 2
_rng = np.random.default_rng(0)
WEIGHTS = {name: (_rng.standard_normal(shape) * 0.5).astype(np.float32) for name, shape in
           {"query": (LAYERS, HEADS * HEAD_DIM, HIDDEN), "key": (LAYERS, HEADS * HEAD_DIM, HIDDEN),
            "value": (LAYERS, HEADS * HEAD_DIM, HIDDEN), "output": (LAYERS, HIDDEN, HEADS * HEAD_DIM)}.items()}
WEIGHT_TENSORS = {name: Tensor(value) for name, value in WEIGHTS.items()}
BATCHES = [(Tensor(_rng.standard_normal((BATCH, SEQUENCE, HIDDEN)).astype(np.float32)),
            Tensor(_rng.standard_normal((BATCH, SEQUENCE, HIDDEN)).astype(np.float32))) for _ in range(2)]


def split_heads(tensor):
    return tensor.reshape(BATCH, SEQUENCE, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)  # (B, H, S, d)


def attention_loss(head_mask, hidden, target):
    """Tiny residual multi-head attention stack; head_mask (LAYERS, HEADS) scales attention probabilities."""
    for layer in range(LAYERS):
        query = split_heads(ops.matmul(hidden, WEIGHT_TENSORS["query"][layer].T))
        key = split_heads(ops.matmul(hidden, WEIGHT_TENSORS["key"][layer].T))
        value = split_heads(ops.matmul(hidden, WEIGHT_TENSORS["value"][layer].T))
        scores = ops.matmul(query, key.transpose(0, 1, 3, 2)) / (HEAD_DIM ** 0.5)  # (B, H, S, S)
        probabilities = ops.softmax(scores, -1) * head_mask[layer].reshape(1, HEADS, 1, 1)
        context = ops.matmul(probabilities, value).transpose(0, 2, 1, 3).reshape(BATCH, SEQUENCE, -1)  # (B, S, H*d)
        hidden = hidden + ops.matmul(context, WEIGHT_TENSORS["output"][layer].T)
    difference = hidden - target
    return (difference * difference).mean()


def twin_attention_loss(head_mask, hidden, target):
    hidden = hidden.astype(np.float64)
    for layer in range(LAYERS):
        projections = [np.einsum("bsh,oh->bso", hidden, WEIGHTS[name][layer].astype(np.float64))
                       .reshape(BATCH, SEQUENCE, HEADS, HEAD_DIM).transpose(0, 2, 1, 3)
                       for name in ("query", "key", "value")]
        scores = projections[0] @ projections[1].transpose(0, 1, 3, 2) / np.sqrt(HEAD_DIM)
        probabilities = np.exp(scores - scores.max(-1, keepdims=True))
        probabilities /= probabilities.sum(-1, keepdims=True)
        probabilities *= head_mask[layer][None, :, None, None]
        context = (probabilities @ projections[2]).transpose(0, 2, 1, 3).reshape(BATCH, SEQUENCE, -1)
        hidden = hidden + context @ WEIGHTS["output"][layer].astype(np.float64).T
    return float(np.mean((hidden - target) ** 2))


def twin_head_importance(batches, step=1e-6):
    importance = np.zeros((LAYERS, HEADS))
    for hidden, target in batches:
        hidden, target = hidden.asnumpy(), target.asnumpy().astype(np.float64)
        for layer in range(LAYERS):
            for head in range(HEADS):
                plus, minus = np.ones((LAYERS, HEADS)), np.ones((LAYERS, HEADS))
                plus[layer, head] += step
                minus[layer, head] -= step
                gradient = (twin_attention_loss(plus, hidden, target)
                            - twin_attention_loss(minus, hidden, target)) / (2 * step)
                importance[layer, head] += abs(gradient)
    return importance


@pytest.mark.parametrize("use_jit", [True, False])
def test_head_importance_matches_finite_differences(use_jit):
    actual = head_importance(attention_loss, BATCHES, LAYERS, HEADS, use_jit=use_jit)
    assert actual.shape == (LAYERS, HEADS) and actual.dtype == np.float64
    np.testing.assert_allclose(actual, twin_head_importance(BATCHES), rtol=2e-3, atol=1e-7)


def signed_loss(head_mask, sign):
    return (head_mask * Tensor(np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3))).sum() * sign


def test_head_importance_sums_absolute_per_batch_gradients():
    """Deliberate deviation from the reference: batches with opposite gradients add up (2*|g|) instead of
    cancelling in a running sum (|g - g| = 0)."""
    batches = [Tensor(np.float32(1.0)), Tensor(np.float32(-1.0))]
    importance = head_importance(signed_loss, batches, 2, 3, use_jit=False)
    np.testing.assert_allclose(importance, 2 * np.arange(1.0, 7.0).reshape(2, 3))


def nan_loss(head_mask, scale):
    return (head_mask * scale).sum()


def test_head_importance_errors():
    with pytest.raises(ValueError, match="batches is empty"):
        head_importance(signed_loss, [], 2, 3, use_jit=False)
    with pytest.raises(ValueError, match="head-mask gradient of batch 1 contains 6 NaN"):
        head_importance(nan_loss, [Tensor(np.float32(1.0)), Tensor(np.float32(np.nan))], 2, 3, use_jit=False)
    with pytest.raises(ValueError, match="num_heads must be a positive integer"):
        head_importance(signed_loss, [Tensor(np.float32(1.0))], 2, 0)


# ---------------------------------------------------------------- FFN --------------------------------------------
def twin_ffn_importance(w1, b1, g_w1, g_b1, w2, g_w2):
    w1, b1, g_w1, g_b1, w2, g_w2 = (a.astype(np.float64) for a in (w1, b1, g_w1, g_b1, w2, g_w2))
    scores = np.zeros(w1.shape[0])
    for neuron in range(w1.shape[0]):
        first = sum(w1[neuron, k] * g_w1[neuron, k] for k in range(w1.shape[1])) + b1[neuron] * g_b1[neuron]
        second = sum(w2[k, neuron] * g_w2[k, neuron] for k in range(w2.shape[0]))
        scores[neuron] = abs(first) + abs(second)
    return scores


@pytest.mark.parametrize("ffn_size,hidden,scale", [(6, 4, 1.0), (1, 1, 1.0), (5, 3, 0.0), (4, 2, 1e15)])
def test_ffn_importance_matches_twin(ffn_size, hidden, scale):
    rng = np.random.default_rng(ffn_size)
    arrays = [(rng.standard_normal(shape) * scale).astype(np.float32) for shape in
              [(ffn_size, hidden), (ffn_size,), (ffn_size, hidden), (ffn_size,), (hidden, ffn_size),
               (hidden, ffn_size)]]
    actual = ffn_importance(*(Tensor(a) for a in arrays)).asnumpy()
    expected = twin_ffn_importance(*arrays)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * max(expected.max(), 1e-30))


def gated_ffn_loss(w1, b1, w2, pre_gate, post_gate, x, target):
    """FFN with a gate on each neuron's pre-activation and activation (gates = 1 leave it unchanged)."""
    activation = ops.tanh((ops.matmul(x, w1.T) + b1) * pre_gate) * post_gate  # (B, ffn)
    difference = ops.matmul(activation, w2.T) - target  # (B, hidden)
    return (difference * difference).mean()


def test_ffn_importance_is_first_order_taylor_of_neuron_gates():
    """The two terms equal |dL/d gate| for gates on the pre-activation and the activation of each neuron."""
    rng = np.random.default_rng(1)
    w1, b1, w2 = (Tensor(rng.standard_normal(shape).astype(np.float32)) for shape in [(5, 3), (5,), (3, 5)])
    pre_gate, post_gate = Tensor(np.ones(5, np.float32)), Tensor(np.ones(5, np.float32))  # distinct objects
    x, target = (Tensor(rng.standard_normal((4, 3)).astype(np.float32)) for _ in range(2))
    g_w1, g_b1, g_w2, g_pre, g_post = ms.grad(gated_ffn_loss, grad_position=(0, 1, 2, 3, 4))(
        w1, b1, w2, pre_gate, post_gate, x, target)
    actual = ffn_importance(w1, b1, g_w1, g_b1, w2, g_w2).asnumpy()
    np.testing.assert_allclose(actual, np.abs(g_pre.asnumpy()) + np.abs(g_post.asnumpy()), rtol=1e-4, atol=1e-7)


@ms.jit
def ffn_importance_graph(w1, b1, g_w1, g_b1, w2, g_w2):
    return ffn_importance(w1, b1, g_w1, g_b1, w2, g_w2)


def test_ffn_importance_in_graph_and_shape_errors():
    rng = np.random.default_rng(2)
    arrays = [Tensor(rng.standard_normal(shape).astype(np.float32)) for shape in
              [(6, 4), (6,), (6, 4), (6,), (4, 6), (4, 6)]]
    np.testing.assert_allclose(ffn_importance_graph(*arrays).asnumpy(), ffn_importance(*arrays).asnumpy(),
                               rtol=1e-6)
    with pytest.raises(ValueError, match=r"intermediate_bias_grad has shape \(5,\), expected \(6,\)"):
        ffn_importance(arrays[0], arrays[1], arrays[2], Tensor(np.zeros(5, np.float32)), arrays[4], arrays[5])
    with pytest.raises(ValueError, match="output_weight has shape"):
        transposed = Tensor(np.zeros((6, 4), np.float32))
        ffn_importance(arrays[0], arrays[1], arrays[2], arrays[3], transposed, transposed)
