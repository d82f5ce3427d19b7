"""An independent numpy BERT / NEZHA forward pass on Hugging Face tensor names, for parity tests.

Written from the maths (algorithms.md Part B 1.1-1.2 and the BERT paper), not from the package: it uses einsum where
the package uses reshapes and batched matmuls, float64 throughout, and HF names so it also checks the renaming.
"""
import math

import numpy as np

_erf = np.vectorize(math.erf)


def gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


def linear(x, weights, name):
    return x @ weights[name + ".weight"].astype(np.float64).T + weights[name + ".bias"]


def relative_embeddings(length, max_distance, dim):
    table = np.zeros((2 * max_distance + 1, dim))
    for p in range(2 * max_distance + 1):
        for i in range(dim):
            angle = p / (10000.0 ** ((i - i % 2) / dim))
            table[p, i] = math.sin(angle) if i % 2 == 0 else math.cos(angle)
    out = np.zeros((length, length, dim))
    for i in range(length):
        for j in range(length):
            out[i, j] = table[min(max(j - i, -max_distance), max_distance) + max_distance]
    return out


def forward(weights, config, input_ids, attention_mask, token_type_ids=None, head_dim=None, layer_heads=None,
            head_mask=None):
    """Returns (last hidden (B,L,H), pooled or None, hidden list, pre-softmax masked scaled score list)."""
    w = {k[5:] if k.startswith("bert.") else k: np.asarray(v, dtype=np.float64) for k, v in weights.items()}
    eps = config["layer_norm_eps"]
    batch, length = input_ids.shape
    if token_type_ids is None:
        token_type_ids = np.zeros_like(input_ids)
    x = w["embeddings.word_embeddings.weight"][input_ids] + w["embeddings.token_type_embeddings.weight"][token_type_ids]
    relative = config.get("relative", False)
    if not relative:
        x = x + w["embeddings.position_embeddings.weight"][np.arange(length)][None]
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    hidden_list, score_list = [x], []
    bias = (1.0 - attention_mask[:, None, None, :].astype(np.float64)) * -10000.0
    for layer in range(config["num_layers"]):
        p = f"encoder.layer.{layer}."
        heads = layer_heads[layer] if layer_heads else config["num_heads"]
        d = head_dim or config["hidden_size"] // config["num_heads"]
        q = linear(x, w, p + "attention.self.query").reshape(batch, length, heads, d)
        k = linear(x, w, p + "attention.self.key").reshape(batch, length, heads, d)
        v = linear(x, w, p + "attention.self.value").reshape(batch, length, heads, d)
        scores = np.einsum("bihd,bjhd->bhij", q, k)
        if relative:
            rel = relative_embeddings(length, config["max_relative_position"], d)
            scores = scores + np.einsum("bihd,ijd->bhij", q, rel)
        scores = scores / math.sqrt(d) + bias
        score_list.append(scores)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs = probs / probs.sum(-1, keepdims=True)
        if head_mask is not None:
            probs = probs * head_mask[layer][None, :heads, None, None]
        context = np.einsum("bhij,bjhd->bihd", probs, v)
        if relative:
            context = context + np.einsum("bhij,ijd->bihd", probs, rel)
        context = context.reshape(batch, length, heads * d)
        attended = layer_norm(linear(context, w, p + "attention.output.dense") + x,
                              w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"], eps)
        inner = gelu(linear(attended, w, p + "intermediate.dense"))
        x = layer_norm(linear(inner, w, p + "output.dense") + attended,
                       w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"], eps)
        hidden_list.append(x)
    pooled = None
    if "pooler.dense.weight" in w:
        pooled = np.tanh(linear(x[:, 0], w, "pooler.dense"))
    return x, pooled, hidden_list, score_list


def random_hf_weights(config, seed=0, head_dim=None, layer_heads=None, layer_ffn=None, relative=False,
                      with_pooler=True):
    """Random HF-named tensors for a tiny config (float32, like real checkpoints)."""
    rng = np.random.default_rng(seed)
    hidden = config["hidden_size"]

    def normal(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = {
        "embeddings.word_embeddings.weight": normal(config["vocab_size"], hidden, scale=1.0),
        "embeddings.token_type_embeddings.weight": normal(config["type_vocab_size"], hidden),
        "embeddings.LayerNorm.weight": 1.0 + normal(hidden, scale=0.1),
        "embeddings.LayerNorm.bias": normal(hidden, scale=0.1),
    }
    if not relative:
        w["embeddings.position_embeddings.weight"] = normal(config["max_position_embeddings"], hidden)
    for layer in range(config["num_layers"]):
        p = f"encoder.layer.{layer}."
        heads = layer_heads[layer] if layer_heads else config["num_heads"]
        width = heads * (head_dim or hidden // config["num_heads"])
        ffn = layer_ffn[layer] if layer_ffn else config["intermediate_size"]
        for name in ("query", "key", "value"):
            w[p + f"attention.self.{name}.weight"] = normal(width, hidden)
            w[p + f"attention.self.{name}.bias"] = normal(width, scale=0.1)
        w[p + "attention.output.dense.weight"] = normal(hidden, width)
        w[p + "attention.output.dense.bias"] = normal(hidden, scale=0.1)
        w[p + "attention.output.LayerNorm.weight"] = 1.0 + normal(hidden, scale=0.1)
        w[p + "attention.output.LayerNorm.bias"] = normal(hidden, scale=0.1)
        w[p + "intermediate.dense.weight"] = normal(ffn, hidden)
        w[p + "intermediate.dense.bias"] = normal(ffn, scale=0.1)
        w[p + "output.dense.weight"] = normal(hidden, ffn)
        w[p + "output.dense.bias"] = normal(hidden, scale=0.1)
        w[p + "output.LayerNorm.weight"] = 1.0 + normal(hidden, scale=0.1)
        w[p + "output.LayerNorm.bias"] = normal(hidden, scale=0.1)
    if with_pooler:
        w["pooler.dense.weight"] = normal(hidden, hidden)
        w["pooler.dense.bias"] = normal(hidden, scale=0.1)
    return w
