"""DynaBERT's width and depth arithmetic as data: which heads, FFN neurons and layers a (width, depth) keeps.

Width (the reference's `round_to_nearest`, algorithms.md 3.1): a layer of N heads keeps round(N * w) heads and,
of its I FFN neurons, max(1, I * round(N * w) / N) (floored), so FFN and attention shrink by the same ratio.
`round` is Python's (ties to even), as in the reference: 0.125 of 12 heads keeps round(1.5) = 2 heads. The FFN size
is computed in integers, so a size like 7/12 of 3072 is exactly 1792 (the reference's float product can only agree).
After rewiring, the kept units are the LEADING ones: heads 0..k-1, neurons 0..m-1.

Depth (algorithms.md 3.2): round(L * d) layers are kept (Python's round again), layer indices floor(i / d) for
i = 0..depth-1, with d read as the decimal it was written as (0.7 is 7/10, so floor(7 / 0.7) is 10, never 9).
d = 0.5 of 12 keeps 0, 2, ..., 10; d = 0.75 keeps 0, 1, 2, 4, 5, 6, 8, 9, 10. Hidden-state distillation matches
student state j with teacher state floor(j / d) (`depth_layer_mapping`). When L * d is a whole number (every default
on 12 or 24 layers) this equals `distill.mapping.depth_mapping`, which reads d as depth / L; when it is not (0.75 of
MiniLM's 6 layers: round(4.5) = 4 layers) the two differ, and DynaBERT follows the reference: kept 0, 1, 2, 4 and
teacher states 0, 1, 2, 4, 5, where depth_mapping would give 0, 1, 3, 4, 6.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Tuple

from fractions import Fraction

from ms_nlp_compress.compress.distill.mapping import LayerMapping
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError


def _check_multiplier(kind: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise ConfigError(f"{kind} multiplier must be a number in (0, 1], got {value!r}")
    return float(value)


def heads_kept(num_heads: int, width: float) -> int:
    """round(num_heads * width): the reference's head count. A width keeping no head is an error naming it."""
    width = _check_multiplier("width", width)
    heads = round(num_heads * width)
    if heads < 1:
        raise ConfigError(f"width multiplier {width} keeps round({num_heads} * {width}) = 0 of {num_heads} heads; "
                          f"only widths above {0.5 / num_heads:.4g} keep a head")
    return heads


def intermediate_kept(intermediate_size: int, num_heads: int, width: float) -> int:
    """max(1, floor(intermediate_size * round(num_heads * width) / num_heads)): FFN neurons kept at `width`."""
    return max(1, intermediate_size * heads_kept(num_heads, width) // num_heads)


def _depth_count(num_layers: int, depth: float) -> Tuple[int, Fraction]:
    depth = _check_multiplier("depth", depth)
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ConfigError(f"num_layers must be a positive integer, got {num_layers!r}")
    count = round(num_layers * depth)
    if count < 1:
        raise ConfigError(f"depth multiplier {depth} keeps no layer of a {num_layers}-layer model "
                          f"(round({num_layers} * {depth}) = 0)")
    return count, Fraction(repr(depth))  # the decimal as written: exact floors


def kept_layers(num_layers: int, depth: float) -> Tuple[int, ...]:
    """0-based indices of the layers a depth multiplier keeps: floor(i / d), i = 0..round(L * d) - 1."""
    count, exact = _depth_count(num_layers, depth)
    return tuple(int(i / exact) for i in range(count))


def depth_layer_mapping(num_layers: int, depth: float) -> LayerMapping:
    """Hidden-state matching of the depth-d sub-network with a full-depth teacher of L layers: student state j
    (0 = embeddings) meets teacher state floor(j / d), capped at L (with round-half-to-even depth, e.g. 2 of 3
    layers at d = 0.5, floor(2 / 0.5) = 4 would name a layer the teacher does not have)."""
    count, exact = _depth_count(num_layers, depth)
    return LayerMapping(tuple(min(int(j / exact), num_layers) for j in range(count + 1)), num_layers)


@dataclass(frozen=True)
class SubnetworkShape:
    """One (width, depth) sub-network: `layers[i]` is the full-model layer that becomes its layer i, with
    `heads[i]` leading heads and `intermediate[i]` leading FFN neurons."""

    width: float
    depth: float
    layers: Tuple[int, ...]
    heads: Tuple[int, ...]
    intermediate: Tuple[int, ...]

    @property
    def name(self) -> str:
        return f"w{self.width:g}_d{self.depth:g}"


def subnetwork_shape(config: NezhaConfig, width: float, depth: float) -> SubnetworkShape:
    """The shape of the (width, depth) sub-network of a model with `config` (per-layer widths respected)."""
    layers = kept_layers(config.num_layers, depth)
    heads, intermediate = [], []
    for layer in layers:
        full_heads = config.heads_of_layer(layer)
        try:
            heads.append(heads_kept(full_heads, width))
        except ConfigError as err:
            raise ConfigError(f"layer {layer}: {err}") from None
        intermediate.append(intermediate_kept(config.intermediate_of_layer(layer), full_heads, width))
    return SubnetworkShape(float(width), float(depth), tuple(layers), tuple(heads), tuple(intermediate))


def subnetwork_config(config: NezhaConfig, shape: SubnetworkShape) -> NezhaConfig:
    """The backbone config of a physically smaller model of `shape`: fewer layers, per-layer heads and FFN sizes,
    head size kept (so num_heads * head_dim may differ from hidden_size)."""
    smaller = dataclasses.replace(config, num_layers=len(shape.layers), head_dim=config.attention_head_size,
                                  num_heads=max(shape.heads), intermediate_size=max(shape.intermediate),
                                  layer_num_heads=list(shape.heads),
                                  layer_intermediate_sizes=list(shape.intermediate))
    smaller.validate()
    return smaller
