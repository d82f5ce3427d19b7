"""Data-parallel process setup. One code path for HCCL (Ascend), NCCL (GPU) and MindSpore's CPU collectives."""
from __future__ import annotations

import os
from typing import Tuple

from ms_nlp_compress.config import ParallelConfig, RuntimeConfig
from ms_nlp_compress.errors import ConfigError


def launched_by_msrun() -> bool:
    return "MS_WORKER_NUM" in os.environ or "RANK_TABLE_FILE" in os.environ


def init_data_parallel(parallel: ParallelConfig, runtime: RuntimeConfig) -> Tuple[int, int]:
    """Join the collective group when `parallel.world_size > 1`; returns (rank, world size).

    The backend is inferred by MindSpore from the device (hccl / nccl / mccl on CPU). A world size that differs
    from the launcher's is an error: silently training with a different global batch would change the run.
    """
    if parallel.world_size == 1:
        return 0, 1
    if not launched_by_msrun():
        raise ConfigError(f"parallel.world_size is {parallel.world_size} but this process was not started by msrun; "
                          "use scripts/run_distributed.sh (or set parallel.world_size=1)")
    from mindspore.communication import get_group_size, get_rank, init

    if runtime.device == "cpu":
        from ms_nlp_compress.runtime import set_cpu_threads

        set_cpu_threads(runtime.cpu_threads or 1)  # several ranks share the cores: the default 25 thrashes
    init()
    rank, size = get_rank(), get_group_size()
    if size != parallel.world_size:
        raise ConfigError(f"parallel.world_size is {parallel.world_size} but msrun started {size} workers")
    return rank, size
