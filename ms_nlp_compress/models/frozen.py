"""A frozen sub-cell: always in eval mode, no gradients, no optimizer state.

Why a wrapper: `Cell.set_train(True)` calls `add_flags_recursive(training=True)`, which walks every child cell. A
teacher held inside a distillation loss cell therefore silently trained with dropout on (verified on 2.10). `Frozen`
intercepts that walk for its subtree, so whatever mode the enclosing cell is put in, the teacher runs in eval mode,
and its Parameters have `requires_grad=False`, so `trainable_params()` (the optimizer's list) never contains them.
"""
from __future__ import annotations

from mindspore import nn


class Frozen(nn.Cell):
    """Wraps `cell`; calls pass through. Its outputs depend on no trainable weight, so autodiff prunes it.

    The wrapped cell's Parameters are named `<attribute>.cell.<name>`; load a teacher's weights into the cell before
    wrapping it (or into `frozen.cell`), since teachers are never checkpointed with the student.
    """

    def __init__(self, cell: nn.Cell):
        super().__init__()
        self.cell = cell
        for param in cell.get_parameters():
            param.requires_grad = False
        nn.Cell.add_flags_recursive(cell, training=False)

    def add_flags_recursive(self, **flags):
        if "training" in flags:
            flags = dict(flags, training=False)
        self.add_flags(**flags)
        nn.Cell.add_flags_recursive(self.cell, **flags)
        return self

    def construct(self, *inputs):
        return self.cell(*inputs)


def is_frozen(cell: nn.Cell) -> bool:
    return isinstance(cell, Frozen)
