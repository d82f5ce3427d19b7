"""A barrier with a verdict: every rank waits until every rank arrives, and all learn how many succeeded.

Used by the Trainer's checkpointing: each rank writes its own state file, then joins `RankBarrier.agree(ok)`;
rank 0 publishes the checkpoint only when the count equals the world size, and every rank sees the same count,
so a rank that failed to write makes all ranks fail together instead of leaving one waiting in a collective.

One AllReduce of a single float32 (MindSpore's CPU collectives take float all-reduce; HCCL and NCCL too).
"""
from __future__ import annotations

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops


class _SumOverRanks(nn.Cell):
    def __init__(self):
        super().__init__()
        self.all_reduce = ops.AllReduce()

    def construct(self, value):
        return self.all_reduce(value)


class RankBarrier:
    """`agree(ok)` -> number of ranks that passed ok=True (world size 1: no collective)."""

    def __init__(self, world_size: int):
        self.world_size = int(world_size)
        self._sum = _SumOverRanks() if self.world_size > 1 else None

    def agree(self, ok: bool) -> int:
        vote = np.array([1.0 if ok else 0.0], np.float32)
        if self._sum is None:
            return int(vote[0])
        return int(round(float(self._sum(Tensor(vote, ms.float32)).asnumpy()[0])))
