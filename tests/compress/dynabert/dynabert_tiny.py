"""Shared tiny models for the DynaBERT tests: random full models and the independent "fresh model loaded with the
leading slices" reference."""
import dataclasses
import re

import numpy as np
from mindspore import Tensor

from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

NUM_LABELS = 3


def tiny_config(position_embedding="relative", **overrides):
    """4 layers of 4 heads of size 3 over hidden 8 (heads * head_dim != hidden on purpose), FFN 12."""
    values = dict(vocab_size=40, hidden_size=8, num_layers=4, num_heads=4, head_dim=3, intermediate_size=12,
                  max_position_embeddings=16, max_relative_position=4, position_embedding=position_embedding,
                  hidden_act="gelu")
    values.update(overrides)
    return NezhaConfig(**values)


def randomize(model, seed):
    """Replace every float Parameter by N(0, 0.4^2) values (LayerNorm scales around 1): outputs far from zero, so
    an absolute tolerance means something."""
    rng = np.random.default_rng(seed)
    for name, param in model.parameters_and_names():
        if "rng_counter" in name:
            continue
        value = rng.standard_normal(param.shape) * 0.4
        if name.endswith("gamma"):
            value = 1.0 + value * 0.5
        param.set_data(Tensor(value.astype(np.float32)))
    return model


def random_model(config, seed=0, hidden_states=True):
    model = NezhaForSequenceClassification(config, NUM_LABELS, output_hidden_states=hidden_states)
    model.set_train(False)
    return randomize(model, seed)


def batch(seed=1, batch_size=2, length=5, vocab=40):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (batch_size, length)).astype(np.int32)
    mask = np.ones((batch_size, length), np.int32)
    mask[0, -2:] = 0  # padding in the first row
    ids[0, -2:] = 0
    types = np.zeros((batch_size, length), np.int32)
    types[:, 3:] = 1
    return Tensor(ids), Tensor(mask), Tensor(types)


def leading_slice_weights(full_weights, reference_model, layers):
    """Weights for `reference_model` (a smaller model): each tensor is the LEADING block of the full model's tensor
    of the same name, sub layer i taken from full layer layers[i]."""
    weights = {}
    for name, param in reference_model.parameters_and_names():
        full_name = re.sub(r"encoder\.layers\.(\d+)\.", lambda m: f"encoder.layers.{layers[int(m.group(1))]}.", name)
        full = full_weights[full_name]
        weights[name] = full[tuple(slice(0, size) for size in param.shape)].copy()
    return weights


def fresh_reference(config, layers, heads, intermediate, full_weights, hidden_states=True):
    """A NezhaForSequenceClassification built directly at the smaller size, loaded with the sliced weights."""
    smaller = dataclasses.replace(config, num_layers=len(layers), head_dim=config.attention_head_size,
                                  layer_num_heads=list(heads), layer_intermediate_sizes=list(intermediate))
    model = NezhaForSequenceClassification(smaller, NUM_LABELS, output_hidden_states=hidden_states)
    model.set_train(False)
    for name, value in leading_slice_weights(full_weights, model, layers).items():
        dict(model.parameters_and_names())[name].set_data(Tensor(value))
    return model


def numpy_weights(model):
    return {name: param.asnumpy().copy() for name, param in model.parameters_and_names()}


def outputs(model, inputs):
    logits, hidden, _ = model(*inputs)
    return [logits.asnumpy()] + [state.asnumpy() for state in hidden]
