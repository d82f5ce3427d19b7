"""Elastic width and depth: every (width, depth) sub-network is its own Cell sharing the full model's Parameters.

Why separate Cells and not a width attribute: in graph mode a Cell compiled once keeps its graph, so changing a
Python `width` afterwards is silently ignored (compress_design.md, "graph-mode traps"). A sub-network here is an
ordinary `NezhaForSequenceClassification` of the smaller size (fewer layers, per-layer heads and FFN sizes, head
size kept) whose leaf cells are the FULL model's own cells: LayerNorms, embeddings, pooler, classifier and dropout
cells are shared as objects, and the Dense cells that shrink become `SlicedDense` views over the full Dense's
Parameters (leading rows for Q/K/V and FFN-in, leading columns for attention-out and FFN-out, with constant bounds).
Each sub-network therefore compiles its own graph with the real, smaller matmuls, and an update through any of them
lands in the one set of full-model Parameters that every other sub-network reads.

Parameter names: MindSpore renames a Parameter whenever a cell holding it is assigned as an attribute of another
cell (`Cell.__setattr__` -> `update_parameters_name`). Sub-networks are assembled with `insert_child_to_cell`, which
does not rename, and `names_kept` restores the full model's names around any code that nests sub-networks (a
`Distiller` assigning its student), so checkpoints and optimizer state keep the full model's names.
"""
from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterator, Tuple

import numpy as np
from mindspore import nn, ops

from ms_nlp_compress.compress.dynabert.sizes import SubnetworkShape, subnetwork_config, subnetwork_shape
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

_LAYER_NAME = re.compile(r"(^|\.)encoder\.layers\.(\d+)(?=\.|$)")


class SlicedDense(nn.Cell):
    """y = x W[:out, :in]^T + b[:out] over a SHARED full nn.Dense's `weight` / `bias` (same attribute names, so a
    sub-network's parameter names are those of a model of its size). Bounds are construction-time constants."""

    def __init__(self, dense: nn.Dense, out_features: int, in_features: int):
        super().__init__()
        full_out, full_in = dense.weight.shape
        if not (0 < out_features <= full_out and 0 < in_features <= full_in):
            raise ConfigError(f"SlicedDense: cannot take ({out_features}, {in_features}) leading rows/columns of "
                              f"a ({full_out}, {full_in}) weight")
        if dense.activation_flag:
            raise ConfigError("SlicedDense: a Dense with a fused activation is not a NEZHA projection")
        self.weight = dense.weight  # the full Parameter itself, not a copy
        self.has_bias = dense.has_bias
        if self.has_bias:
            self.bias = dense.bias
        self.out_features, self.in_features = out_features, in_features
        self.slice_rows = out_features < full_out
        self.slice_columns = in_features < full_in

    def construct(self, x):
        weight = self.weight
        if self.slice_rows:
            weight = weight[: self.out_features]
        if self.slice_columns:
            weight = weight[:, : self.in_features]  # (out, in)
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # (N, in): as nn.Dense, a 2-D matmul
        y = ops.matmul(x, weight.T)
        if self.has_bias:
            bias = self.bias[: self.out_features] if self.slice_rows else self.bias
            y = y + bias
        return y.reshape(shape[:-1] + (self.out_features,))  # (..., out)

    def sliced(self, name: str, value: np.ndarray) -> np.ndarray:
        """The part of the full Parameter `name` ('weight' / 'bias') this view uses, as numpy."""
        if name == "weight":
            return value[: self.out_features, : self.in_features]
        return value[: self.out_features]


def _full_cell_name(name: str, layers: Tuple[int, ...]) -> str:
    """A sub-network cell's name -> the full model's: sub layer i is full layer layers[i]."""
    return _LAYER_NAME.sub(lambda m: f"{m.group(1)}encoder.layers.{layers[int(m.group(2))]}", name, count=1)


def _child(root: nn.Cell, dotted: str) -> Tuple[nn.Cell, str]:
    parent = root
    *path, attribute = dotted.split(".")
    for part in path:
        parent = parent._cells[part]  # pylint: disable=protected-access
    return parent, attribute


@contextlib.contextmanager
def names_kept(model: nn.Cell) -> Iterator[None]:
    """Restore every Parameter name of `model` after the block (see the module docstring)."""
    saved = [(param, param.name) for param in model.get_parameters()]
    try:
        yield
    finally:
        for param, name in saved:
            param.name = name


def build_subnetwork(model: NezhaForSequenceClassification, shape: SubnetworkShape,
                     output_hidden_states: bool = False, output_attentions: bool = False
                     ) -> NezhaForSequenceClassification:
    """A NezhaForSequenceClassification of `shape` made of `model`'s own cells and SlicedDense views.

    It owns no Parameter of its own: `get_parameters()` are objects of `model`. Leaf cells without Parameters
    (softmax, the relative-position table) are shared too, and dropout cells with their counters, so a sub-network
    layer draws from the dropout stream of the full layer it is.
    """
    if not isinstance(model, NezhaForSequenceClassification):
        raise ConfigError(f"DynaBERT sub-networks need a NezhaForSequenceClassification, got {type(model).__name__}")
    config = subnetwork_config(model.bert.config, shape)
    # A fresh model of the sub-network's size gives the structure (per-layer head counts in the attention
    # reshapes); its leaf cells are then swapped for the full model's, so its own Parameters are dropped.
    sub = NezhaForSequenceClassification(config, model.num_labels, output_hidden_states=output_hidden_states,
                                         output_attentions=output_attentions)
    full_cells = dict(model.cells_and_names())
    swapped = []
    for name, cell in list(sub.cells_and_names()):
        # Swap every cell that owns Parameters (with its children: a CPU LayerNorm owns gamma/beta AND holds a
        # function cell) and every leaf; containers stay the sub-network's own.
        owns_parameters = bool(cell._params)  # pylint: disable=protected-access
        if not name or not (owns_parameters or not cell._cells) \
                or any(name.startswith(prefix + ".") for prefix in swapped):  # pylint: disable=protected-access
            continue
        swapped.append(name)
        full_name = _full_cell_name(name, shape.layers)
        full_cell = full_cells.get(full_name)
        if full_cell is None or type(full_cell) is not type(cell):
            raise ConfigError(f"sub-network cell {name} has no {type(cell).__name__} counterpart {full_name} in the "
                              "full model")
        replacement = full_cell
        if isinstance(cell, nn.Dense) and tuple(cell.weight.shape) != tuple(full_cell.weight.shape):
            replacement = SlicedDense(full_cell, *cell.weight.shape)
        else:
            full_params = dict(full_cell.parameters_and_names())
            for param_name, param in cell.parameters_and_names():
                full_shape = tuple(full_params[param_name].shape)
                if tuple(param.shape) != full_shape:
                    raise ConfigError(f"sub-network {name}.{param_name} has shape {tuple(param.shape)} but the full "
                                      f"model's is {full_shape}: only Dense cells are sliced")
        parent, attribute = _child(sub, name)
        parent.insert_child_to_cell(attribute, replacement)  # no renaming of the full model's Parameters
    return sub


class ElasticModel:
    """The full (rewired) model and its sub-networks, one Cell per (width, depth), built on first use and cached.

    `model` is what is trained and checkpointed; `subnetwork(w, d)` returns a Cell that shares its Parameters
    (built with output_hidden_states for distillation when `hidden_states`).
    """

    def __init__(self, model: NezhaForSequenceClassification):
        if not isinstance(model, NezhaForSequenceClassification):
            raise ConfigError(f"DynaBERT needs a NezhaForSequenceClassification, got {type(model).__name__}")
        self.model = model
        self.config = model.bert.config
        self._subnetworks: Dict[Tuple[float, float, bool, bool], NezhaForSequenceClassification] = {}

    def shape(self, width: float, depth: float) -> SubnetworkShape:
        return subnetwork_shape(self.config, width, depth)

    def subnetwork(self, width: float, depth: float, hidden_states: bool = False,
                   attentions: bool = False) -> NezhaForSequenceClassification:
        key = (float(width), float(depth), bool(hidden_states), bool(attentions))
        if key not in self._subnetworks:
            self._subnetworks[key] = build_subnetwork(self.model, self.shape(width, depth), hidden_states,
                                                      attentions)
        return self._subnetworks[key]
