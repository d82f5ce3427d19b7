"""A PyTorch eager twin of the BERT backbone, built from the same Hugging Face-named weights, for benchmarks.

PyTorch is an optional benchmark extra (`pip install torch`); this module imports it lazily, so the package never
needs it. The model is the plain BERT of `bert/modeling_bert.py` (absolute positions, exact erf GELU, additive
-10000 mask bias, post-LayerNorm), written with torch.nn.functional so nothing beyond torch is required.
"""
from __future__ import annotations

from typing import Dict, Optional

import numpy as np


def torch_available() -> Optional[str]:
    """The installed torch version, or None when PyTorch is absent."""
    try:
        import torch
    except ImportError:
        return None
    return torch.__version__


def build_torch_bert(weights: Dict[str, np.ndarray], num_layers: int, num_heads: int, layer_norm_eps: float,
                     num_labels: int = 0, dropout: float = 0.1, seed: int = 0):
    """A torch.nn.Module over HF-named `weights` (optionally prefixed `bert.`).

    forward(input_ids, attention_mask, token_type_ids) returns the sequence output (B, L, H), or the logits (B, C)
    when `num_labels` > 0 (pooler + dropout + linear classifier, like NezhaForSequenceClassification).
    """
    import torch
    from torch import nn
    import torch.nn.functional as F

    torch.manual_seed(seed)
    weights = {k[len("bert."):] if k.startswith("bert.") else k: v for k, v in weights.items()}

    def parameter(name):
        return nn.Parameter(torch.from_numpy(np.ascontiguousarray(weights[name], dtype=np.float32)))

    def linear(name):
        layer = nn.Linear(1, 1)
        layer.weight = parameter(name + ".weight")
        layer.bias = parameter(name + ".bias")
        return layer

    def layer_norm(name):
        norm = nn.LayerNorm(weights[name + ".weight"].shape[0], eps=layer_norm_eps)
        norm.weight = parameter(name + ".weight")
        norm.bias = parameter(name + ".bias")
        return norm

    class Layer(nn.Module):
        def __init__(self, prefix):
            super().__init__()
            self.query = linear(prefix + "attention.self.query")
            self.key = linear(prefix + "attention.self.key")
            self.value = linear(prefix + "attention.self.value")
            self.attention_output = linear(prefix + "attention.output.dense")
            self.attention_norm = layer_norm(prefix + "attention.output.LayerNorm")
            self.intermediate = linear(prefix + "intermediate.dense")
            self.output = linear(prefix + "output.dense")
            self.output_norm = layer_norm(prefix + "output.LayerNorm")
            self.dropout = nn.Dropout(dropout)

        def split(self, x):
            batch, length, _ = x.shape
            return x.view(batch, length, num_heads, -1).transpose(1, 2)  # (B, N, L, D)

        def forward(self, hidden, bias):
            query = self.split(self.query(hidden))
            key = self.split(self.key(hidden))
            value = self.split(self.value(hidden))
            scores = query @ key.transpose(-1, -2) / (query.shape[-1] ** 0.5) + bias  # (B, N, L, L)
            probs = self.dropout(torch.softmax(scores, dim=-1))
            context = (probs @ value).transpose(1, 2).reshape(hidden.shape)  # (B, L, H)
            attended = self.attention_norm(self.dropout(self.attention_output(context)) + hidden)
            inner = F.gelu(self.intermediate(attended))  # exact erf GELU
            return self.output_norm(self.dropout(self.output(inner)) + attended)

    class Bert(nn.Module):
        def __init__(self):
            super().__init__()
            self.word = nn.Embedding.from_pretrained(torch.from_numpy(weights["embeddings.word_embeddings.weight"]),
                                                     freeze=False)
            self.position = nn.Embedding.from_pretrained(
                torch.from_numpy(weights["embeddings.position_embeddings.weight"]), freeze=False)
            self.token_type = nn.Embedding.from_pretrained(
                torch.from_numpy(weights["embeddings.token_type_embeddings.weight"]), freeze=False)
            self.embedding_norm = layer_norm("embeddings.LayerNorm")
            self.dropout = nn.Dropout(dropout)
            self.layers = nn.ModuleList([Layer(f"encoder.layer.{i}.") for i in range(num_layers)])
            self.classify = num_labels > 0
            if self.classify:
                self.pooler = linear("pooler.dense")
                hidden = weights["pooler.dense.weight"].shape[0]
                self.classifier = nn.Linear(hidden, num_labels)

        def forward(self, input_ids, attention_mask, token_type_ids):
            length = input_ids.shape[1]
            positions = torch.arange(length, device=input_ids.device)[None]
            hidden = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
            hidden = self.dropout(self.embedding_norm(hidden))
            bias = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0  # (B, 1, 1, L)
            for layer in self.layers:
                hidden = layer(hidden, bias)
            if not self.classify:
                return hidden
            pooled = torch.tanh(self.pooler(hidden[:, 0]))
            return self.classifier(self.dropout(pooled))

    return Bert()


def torch_adamw(model, learning_rate: float = 2e-5, weight_decay: float = 0.01, eps: float = 1e-6):
    """torch AdamW with the same decay rule as ours: no decay on biases and LayerNorm weights."""
    import torch

    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (no_decay if name.endswith("bias") or "norm" in name else decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=learning_rate, eps=eps)
