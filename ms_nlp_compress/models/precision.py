"""Mixed precision as a copy of the network that shares its Parameters: what `runtime.apply_precision` returns.

Why not `mindspore.amp.auto_mixed_precision` (verified on 2.10, docs/mindspore.md):
- O1 rewrites the network by re-parsing its source (`mindspore.rewrite`): module-level names used inside
  `construct` (our `MASK_BIAS`) became NameErrors, it mutates the original's sub-cells, and it writes
  `./rewritten_network/*.py` into the working directory;
- O2/O3 set float16 flags on the network you pass (the original is changed in place) and return a wrapper;
- both apply to the whole cell given, so a loss cell's loss and its float labels would be cast too.

What this module does instead: `mixed_precision_copy` deep-copies the cell tree with every Parameter object shared
(same objects, same names: float32 masters the optimizer, checkpoints and `save_model_dir` keep using), then sets
the level's policy on the copy only, so the original keeps computing in float32 (evaluation, export, saving).

Policy per level (`low` is float16, or bfloat16 on Ascend):
- O1: matmuls in `low`, everything else float32. Every `nn.Dense` runs in `low` (inputs, weight and bias cast;
  the bias add happens in `low`) and returns float32; cells that declare a `matmul_dtype` attribute (the attention
  score/context matmuls and the MLM decoder of models/nezha.py) cast their bare matmul operands to `low` and the
  product back to float32. Embeddings, GELU, LayerNorm, softmax, dropout, residual adds and the loss are float32.
- O2: the model cells run in `low` (activations, and Parameters cast at use), except LayerNorm (nn.LayerNorm and
  the CPU LayerNorm), softmax and the CPU GELU formulation, which compute in float32 on float32 copies of their
  inputs and hand `low` back; model outputs are cast to float32, so the loss is float32.
- O3: the model cells run entirely in `low`, nn.LayerNorm and softmax included; only the CPU formulations of
  LayerNorm and GELU (`model.kernels: cpu`) stay float32, because their hand-written backward is float32. Model
  outputs are cast to float32, so the loss is float32.
"Model cells" are the children of the network that hold Parameters (for a loss cell: the model, a teacher); the
network's own code (the loss) runs in float32. A network without such children is itself the model cell.
"""
from __future__ import annotations

import copy
from typing import Dict, List, Tuple

import mindspore as ms
from mindspore import Tensor, nn, ops

from ms_nlp_compress.models.kernels import ExactGelu, LayerNorm

LEVELS = ("O1", "O2", "O3")
# Cells O2 keeps in float32.
_O2_FLOAT32_CELLS = (nn.LayerNorm, LayerNorm, nn.Softmax, ExactGelu)
# Cells even O3 keeps in float32: the CPU formulations. Their hand-written bprop replaces the graph in which
# `to_float` casts inputs and Parameters, so under float16 flags their gamma / beta gradients came back float16
# (verified on 2.10); the CPU LayerNorm takes its statistics in float32 whatever the input type anyway.
_O3_FLOAT32_CELLS = (LayerNorm, ExactGelu)


_FLOAT_TYPES = (ms.float16, ms.bfloat16, ms.float32, ms.float64)


def cast_floats(value, dtype):
    """`value` with every floating tensor cast to `dtype`, recursing into tuples and lists; the rest unchanged.

    A plain Cast per tensor, whose gradient is cast back to the input's type. MindSpore's own
    `F.mixed_precision_cast` (used by amp's `_OutputTo32`) handed a float32 gradient to a float16 MatMul in the
    backward pass here (verified on 2.10).
    """
    if isinstance(value, (tuple, list)):
        return tuple(cast_floats(item, dtype) for item in value)
    if isinstance(value, Tensor) and value.dtype in _FLOAT_TYPES:
        return ops.cast(value, dtype)
    return value


class CastOutputs(nn.Cell):
    """Runs `cell` and casts every floating output (tensors inside tuples too) to `dtype`; with `input_dtype`, the
    floating inputs are cast to that type first.

    Why explicit input casts for the float32 islands rather than only `to_float(float32)`: the cast `to_float`
    inserts belongs to the cell's own graph, and a cell with a hand-written `bprop` (the CPU GELU) replaces that
    whole graph in the backward pass, so its gradient came back float32 for a float16 input and the next MatMul
    gradient failed to type-check (verified on 2.10). A cast outside the cell has its own backward.

    No prefix: parameter names stay those of the wrapped cell.
    """

    def __init__(self, cell: nn.Cell, dtype, input_dtype=None):
        super().__init__(auto_prefix=False)
        self.cell = cell
        self.dtype = dtype
        self.input_dtype = input_dtype

    def construct(self, *inputs):
        if self.input_dtype is not None:
            inputs = cast_floats(inputs, self.input_dtype)
        return cast_floats(self.cell(*inputs), self.dtype)


class ModelOutputsToFloat32(CastOutputs):
    """CastOutputs(model, float32) for a model cell, whose public attributes read through to the model, so a loss
    cell that reaches into it (`self.model.bert.embeddings...`, `self.model.num_labels`) compiles unchanged.

    Only public names other than `bprop` pass through: MindSpore looks up `bprop` (and private attributes) on the
    wrapper itself, and a forwarded `bprop` would replace the wrapper's own backward, casts included.
    """

    def __init__(self, model: nn.Cell):
        super().__init__(model, ms.float32)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            cells = self.__dict__.get("_cells", {})
            if name.startswith("_") or name == "bprop" or "cell" not in cells:
                raise
            return getattr(cells["cell"], name)


def shared_parameter_copy(network: nn.Cell) -> nn.Cell:
    """A deep copy of `network` whose Parameters are the original Parameter objects (constants are copied)."""
    memo = {id(param): param for param in network.get_parameters()}
    return copy.deepcopy(network, memo)


def _children(cell: nn.Cell) -> List[Tuple[str, nn.Cell]]:
    return list(cell._cells.items())  # pylint: disable=protected-access  (as mindspore.amp does)


def _replace_child(parent: nn.Cell, name: str, child: nn.Cell) -> None:
    # Straight into the child table: `setattr` would re-prefix the shared Parameters' names.
    parent._cells[name] = child  # pylint: disable=protected-access


def _holds_parameters(cell: nn.Cell) -> bool:
    return next(iter(cell.get_parameters()), None) is not None


def _wrap_matching(root: nn.Cell, kinds: tuple, prepare, out_dtype, in_dtype=None) -> int:
    """Replace every sub-cell of `root` that is one of `kinds` by CastOutputs(prepare(cell), out_dtype, in_dtype).

    A cell reachable from several parents is wrapped once and the same wrapper is used everywhere.
    """
    wrapped: Dict[int, nn.Cell] = {}
    stack = [root]
    visited = set()
    while stack:
        parent = stack.pop()
        if id(parent) in visited:
            continue
        visited.add(id(parent))
        for name, child in _children(parent):
            if child is None or isinstance(child, CastOutputs):
                continue
            if isinstance(child, kinds):
                if id(child) not in wrapped:
                    wrapped[id(child)] = CastOutputs(prepare(child), out_dtype, in_dtype)
                _replace_child(parent, name, wrapped[id(child)])
            else:
                stack.append(child)
    return len(wrapped)


def _set_matmul_dtype(root: nn.Cell, dtype) -> None:
    for _, cell in root.cells_and_names():
        if hasattr(type(cell), "matmul_dtype"):
            cell.matmul_dtype = dtype


def _model_cells(network: nn.Cell) -> List[Tuple[nn.Cell, str, nn.Cell]]:
    """(parent, name, child) for the children of `network` that hold Parameters; `network` itself if none do."""
    found = [(network, name, child) for name, child in _children(network)
             if child is not None and _holds_parameters(child)]
    return found or [(None, "", network)]


def mixed_precision_copy(network: nn.Cell, level: str, dtype=ms.float16) -> nn.Cell:
    """The network to run at `level` ("O1", "O2", "O3"); see the module docstring for the policy."""
    if level not in LEVELS:
        raise ValueError(f"mixed precision level {level!r}: expected one of {LEVELS}")
    clone = shared_parameter_copy(network)
    if level == "O1":
        _set_matmul_dtype(clone, dtype)
        if isinstance(clone, nn.Dense):
            return CastOutputs(clone.to_float(dtype), ms.float32)
        _wrap_matching(clone, (nn.Dense,), lambda dense: dense.to_float(dtype), ms.float32)
        return clone
    keep_float32 = _O2_FLOAT32_CELLS if level == "O2" else _O3_FLOAT32_CELLS
    for parent, name, model in _model_cells(clone):
        model.to_float(dtype)
        _wrap_matching(model, keep_float32, lambda cell: cell.to_float(ms.float32), dtype, ms.float32)
        if isinstance(model, keep_float32):
            continue  # a bare float32 cell (e.g. a lone LayerNorm): nothing runs in low precision
        cast = ModelOutputsToFloat32(model)
        if parent is None:
            return cast
        _replace_child(parent, name, cast)
    return clone
