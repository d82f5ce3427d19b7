"""Independent numpy twins (float64) of the quantizers and of a fake-quantized BERT / NEZHA forward pass.

Written from the maths (algorithms.md Part B 4.2-4.3), not from the package: loops and einsum instead of the
package's reductions and reshapes, native parameter names as `cell_weights` returns them.
"""
import math

import numpy as np

_erf = np.vectorize(math.erf)


def clip(x, value):
    return x if value is None else np.clip(x, -value, value)


def _groups(x, per_row):
    """Apply f per row (last axis) or to the whole tensor."""
    return x.reshape(-1, x.shape[-1]) if per_row else x.reshape(1, -1)


def twn(w, per_row=False, clip_value=2.5):
    w = clip(np.asarray(w, np.float64), clip_value)
    out = np.zeros_like(_groups(w, per_row))
    for i, row in enumerate(_groups(w, per_row)):
        threshold = 0.7 * np.abs(row).mean()
        keep = np.abs(row) > threshold
        alpha = np.abs(row[keep]).mean() if keep.any() else 0.0
        out[i] = alpha * np.sign(row) * keep
    return out.reshape(w.shape)


def lat(w, d=None, per_row=False, clip_value=2.5, iterations=10, init="twn"):
    """Alternating LAT: codes b from TWN (or sign(w)); then alpha = sum d|b w| / sum d|b|, b = sign(w) [|w| > alpha/2]."""
    w = clip(np.asarray(w, np.float64), clip_value)
    d = np.ones_like(w) if d is None else np.asarray(d, np.float64)
    out = np.zeros_like(_groups(w, per_row))
    for i, (row, drow) in enumerate(zip(_groups(w, per_row), _groups(d, per_row))):
        keep = np.abs(row) > (0.7 * np.abs(row).mean() if init == "twn" else 0)
        alpha = (drow * np.abs(row) * keep).sum() / max((drow * keep).sum(), 1e-300)
        for _ in range(iterations):
            keep = np.abs(row) > alpha / 2
            alpha = (drow * np.abs(row) * keep).sum() / (drow * keep).sum() if keep.any() else 0.0
        out[i] = alpha * np.sign(row) * keep
    return out.reshape(w.shape)


def sym(x, bits, per_row=False, clip_value=2.5):
    x = clip(np.asarray(x, np.float64), clip_value)
    top = 2 ** (bits - 1) - 1
    out = np.zeros_like(_groups(x, per_row))
    for i, row in enumerate(_groups(x, per_row)):
        step = np.abs(row).max() / top
        out[i] = 0.0 if step == 0 else np.clip(np.round(row / step), -top, top) * step
    return out.reshape(x.shape)


def minmax(x, bits, per_row=False, clip_value=2.5):
    x = clip(np.asarray(x, np.float64), clip_value)
    top = 2 ** bits - 1
    out = np.zeros_like(_groups(x, per_row))
    for i, row in enumerate(_groups(x, per_row)):
        low, step = row.min(), (row.max() - row.min()) / top
        out[i] = low if step == 0 else low + np.clip(np.round((row - low) / step), 0, top) * step
    return out.reshape(x.shape)


def log(x, bits, per_row=False, clip_value=2.5):
    """Levels 0 and +-2^-k * max|x|, k = 0..K, K = 2^(bits-1) - 2; nearest level in log2 space."""
    x = clip(np.asarray(x, np.float64), clip_value)
    deepest = 2 ** (bits - 1) - 2
    out = np.zeros_like(_groups(x, per_row))
    for i, row in enumerate(_groups(x, per_row)):
        scale = np.abs(row).max()
        for j, value in enumerate(row):
            ratio = abs(value) / scale if scale > 0 else 0.0
            if ratio < 2.0 ** (-(deepest + 1)):
                continue
            k = min(max(-round(math.log2(ratio)), 0), deepest)
            out[i, j] = math.copysign(2.0 ** -k * scale, value)
    return out.reshape(x.shape)


def weight_twin(spec, clip_value=2.5, d=None):
    """A function w -> fake-quantized w for a WeightQuantConfig-like (method, bits, granularity)."""
    per_row = spec.granularity == "row"
    if spec.method == "twn":
        return lambda w: twn(w, per_row, clip_value)
    if spec.method == "lat":
        return lambda w: lat(w, d, per_row, clip_value)
    if spec.method == "sym":
        return lambda w: sym(w, spec.bits, per_row, clip_value)
    if spec.method == "minmax":
        return lambda w: minmax(w, spec.bits, per_row, clip_value)
    if spec.method == "log":
        return lambda w: log(w, spec.bits, per_row, clip_value)
    return lambda w: np.asarray(w, np.float64)


# --------------------------------------------------------------------------------------------------------------
# Fake-quantized BERT / NEZHA forward
# --------------------------------------------------------------------------------------------------------------


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, gamma, beta, eps=1e-12):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def relative_table(length, max_distance, dim):
    out = np.zeros((length, length, dim))
    for i in range(length):
        for j in range(length):
            p = min(max(j - i, -max_distance), max_distance) + max_distance
            for t in range(dim):
                angle = p / (10000.0 ** ((t - t % 2) / dim))
                out[i, j, t] = math.sin(angle) if t % 2 == 0 else math.cos(angle)
    return out


def quantized_classifier_forward(weights, config, quant, ids, mask, types, act):
    """Logits of a prepared NezhaForSequenceClassification (dropout off). `act` quantizes an activation tensor."""
    w = {name: np.asarray(value, np.float64) for name, value in weights.items()}
    enc_q = weight_twin(quant.encoder, quant.weight_clip)
    pool_q = weight_twin(quant.pooler, quant.weight_clip)
    emb_q = weight_twin(quant.embedding, quant.weight_clip)

    def dense(x, name, quantize):
        return np.einsum("...i,oi->...o", act(x), quantize(w[name + ".weight"])) + w[name + ".bias"]

    batch, length = ids.shape
    if quant.embedding.granularity == "row":
        words = np.stack([emb_q(w["bert.embeddings.word_embeddings.embedding_table"][i]) for i in ids.ravel()])
        words = words.reshape(batch, length, -1)
    else:
        words = emb_q(w["bert.embeddings.word_embeddings.embedding_table"])[ids]
    x = words + w["bert.embeddings.token_type_embeddings.embedding_table"][types]
    relative = config.position_embedding == "relative"
    if not relative:
        x = x + w["bert.embeddings.position_embeddings.embedding_table"][np.arange(length)][None]
    x = layer_norm(x, w["bert.embeddings.layer_norm.gamma"], w["bert.embeddings.layer_norm.beta"])
    bias = (1.0 - mask[:, None, None, :].astype(np.float64)) * -10000.0
    heads, d = config.num_heads, config.hidden_size // config.num_heads
    for layer in range(config.num_layers):
        p = f"bert.encoder.layers.{layer}."
        a = p + "attention.self_attention."
        q = act(dense(x, a + "query", enc_q).reshape(batch, length, heads, d))
        k = act(dense(x, a + "key", enc_q).reshape(batch, length, heads, d))
        v = act(dense(x, a + "value", enc_q).reshape(batch, length, heads, d))
        scores = np.einsum("bihd,bjhd->bhij", q, k)
        if relative:
            rel = relative_table(length, config.max_relative_position, d)
            scores = scores + np.einsum("bihd,ijd->bhij", q, rel)
        scores = scores / math.sqrt(d) + bias
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = act(probs / probs.sum(-1, keepdims=True))
        context = np.einsum("bhij,bjhd->bihd", probs, v)
        if relative:
            context = context + np.einsum("bhij,ijd->bihd", probs, rel)
        context = context.reshape(batch, length, heads * d)
        attended = layer_norm(dense(context, p + "attention.output.dense", enc_q) + x,
                              w[p + "attention.output.layer_norm.gamma"], w[p + "attention.output.layer_norm.beta"])
        inner = gelu(dense(attended, p + "ffn.intermediate", enc_q))
        x = layer_norm(dense(inner, p + "ffn.output", enc_q) + attended,
                       w[p + "ffn.layer_norm.gamma"], w[p + "ffn.layer_norm.beta"])
    pooled = np.tanh(dense(x[:, 0], "bert.pooler.dense", pool_q))
    return pooled @ w["classifier.weight"].T + w["classifier.bias"]  # the classifier stays float, input too
