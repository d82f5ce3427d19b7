"""LAT's preconditioner from the optimizer: D = sqrt(v / (1 - beta2^t)) + eps, refreshed after every update.

LAT (Hou & Kwok 2018) minimises the second-order model of the loss around the latent weights with the diagonal
curvature estimate D that Adam already keeps. The prepared model's LAT cells own a non-trainable Parameter
`lat_preconditioner` (prepare.py); `LatRefresh` writes D into all of them from the optimizer's second moments in one
compiled graph. Call it after each optimizer step (before the next forward):

    refresh = LatRefresh(model, optimizer)        # optimizer: train.optim.AdamW/Lamb over the model's weights
    loss, grads = grad_fn(*batch); optimizer(grads); refresh()

Weights are matched to moments by Parameter OBJECT, not by name, so a Distiller that re-prefixes the student's
names does not break the mapping. Before the first update v = 0 and D = eps: uniform, i.e. identity-preconditioned
LAT (the solution is invariant to scaling D).
"""
from __future__ import annotations

from typing import List, Tuple

import mindspore as ms
from mindspore import Parameter, ParameterTuple, Tensor, nn, ops

from ms_nlp_compress.compress.quant.prepare import FakeQuantDense, FakeQuantEmbedding, TiedTableQuant
from ms_nlp_compress.errors import ConfigError


def lat_pairs(model: nn.Cell, optimizer) -> List[Tuple[str, Parameter, Parameter]]:
    """(cell name, preconditioner Parameter, second-moment Parameter) for every LAT cell of a prepared model."""
    if not hasattr(optimizer, "second_moments"):
        raise ConfigError(f"LAT needs an optimizer exposing second_moments() (train.optim.AdamW / Lamb); got "
                          f"{type(optimizer).__name__}")
    moment_of = {id(param): moment for param, moment in zip(optimizer.parameters, optimizer.second_moments())}
    embedding_table = None
    for _, cell in model.cells_and_names():
        if isinstance(cell, FakeQuantEmbedding):
            embedding_table = cell.embedding_table
    pairs = []
    for name, cell in model.cells_and_names():
        if not getattr(cell, "lat", False):
            continue
        if isinstance(cell, FakeQuantDense):
            weight = cell.weight
        elif isinstance(cell, FakeQuantEmbedding):
            weight = cell.embedding_table
        elif isinstance(cell, TiedTableQuant):
            weight = embedding_table
        else:
            continue
        moment = moment_of.get(id(weight)) if weight is not None else None
        if moment is None:
            raise ConfigError(f"LAT cell {name}: its weight {getattr(weight, 'name', '?')} is not among the "
                              "optimizer's parameters, so it has no second moment to precondition with")
        pairs.append((name, cell.lat_preconditioner, moment))
    return pairs


class LatRefresh(nn.Cell):
    """Writes D = sqrt(v / bias_correction) + eps into every LAT preconditioner; `refresh()` after each step."""

    def __init__(self, model: nn.Cell, optimizer, epsilon: float = 1e-8):
        super().__init__()
        pairs = lat_pairs(model, optimizer)
        if not pairs:
            raise ConfigError("LatRefresh: the model has no LAT-quantized cell (quant.<group>.method: lat)")
        self.cell_names = [name for name, _, _ in pairs]
        self.targets = ParameterTuple([target for _, target, _ in pairs])
        self.moments = ParameterTuple([moment for _, _, moment in pairs])
        self.count = len(pairs)
        self.epsilon = float(epsilon)
        # A bound method, not the optimizer itself: a Cell attribute would make the optimizer a child cell and
        # re-prefix the names of every Parameter it holds.
        self._bias_correction = optimizer.second_moment_bias_correction

    def construct(self, bias_correction):
        for index in range(self.count):
            value = ops.sqrt(self.moments[index] / bias_correction) + self.epsilon
            ops.assign(self.targets[index], value)
        return bias_correction

    def refresh(self):
        correction = self._bias_correction()
        return self(Tensor(correction, ms.float32))
