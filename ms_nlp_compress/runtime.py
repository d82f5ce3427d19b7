"""Apply a RuntimeConfig to MindSpore: device, execution mode, threads, fusion, compile cache, seed.

Device is a config value. Nothing here silently assumes CPU: each CPU-only knob is applied only when the device is
cpu, and each Ascend-only one only on ascend.
"""
from __future__ import annotations

import os

import mindspore as ms

from ms_nlp_compress.config import RuntimeConfig

_DEVICE_TARGETS = {"cpu": "CPU", "ascend": "Ascend", "gpu": "GPU"}


def setup_runtime(runtime: RuntimeConfig) -> None:
    """Set MindSpore's global context from `runtime`. Call once, before any Tensor is created on Ascend."""
    target = _DEVICE_TARGETS[runtime.device]
    try:
        ms.set_device(target, runtime.device_id)  # 2.9+: set_context(device_target=...) is deprecated
    except RuntimeError as err:
        # A second setup in one process (a demo running several stages, tests) finds the runtime already up:
        # fine on the same device, an error on another one.
        current = ms.get_context("device_target")
        if current != target:
            raise RuntimeError(f"runtime.device is {runtime.device} but this process already runs on {current}: "
                               "start a new process to change devices") from err
    ms.set_context(mode=ms.GRAPH_MODE if runtime.mode == "graph" else ms.PYNATIVE_MODE)
    if runtime.device == "cpu" and runtime.cpu_threads is not None:
        set_cpu_threads(runtime.cpu_threads)
    if runtime.graph_kernel_fusion:
        ms.set_context(enable_graph_kernel=True)
    if runtime.compile_cache_dir:
        os.makedirs(runtime.compile_cache_dir, exist_ok=True)
        ms.set_context(enable_compile_cache=True, compile_cache_path=runtime.compile_cache_dir)
    ms.set_seed(runtime.seed)


def set_cpu_threads(count: int) -> None:
    """Set the CPU op thread count (MindSpore's default of 25 oversubscribes small machines)."""
    try:
        ms.device_context.cpu.op_tuning.threads_num(count)
    except (AttributeError, RuntimeError):  # already set in this process, or an older API
        pass


def apply_precision(network, precision: str):
    """Cast `network` for mixed precision (MindSpore amp levels O1-O3); fp32 leaves it untouched.

    Parameters stay float32 (the optimizer updates fp32 master weights); O2 keeps LayerNorm and softmax in fp32 and
    returns fp32 outputs. On CPU this runs but is not faster (docs/mindspore.md); it is meant for Ascend.
    """
    if precision == "fp32":
        return network
    from mindspore import amp

    from ms_nlp_compress.errors import ConfigError
    from ms_nlp_compress.models.kernels import ExactGelu, LayerNorm

    cpu_cells = [name for name, cell in network.cells_and_names() if isinstance(cell, (ExactGelu, LayerNorm))]
    if cpu_cells:
        # Their hand-written fp32 backward passes do not mix with amp's fp16 casts (AddN dtype clash, seen on 2.10).
        raise ConfigError(f"runtime.precision {precision} needs model.kernels: fused (the CPU formulations in "
                          f"{cpu_cells[0]} and {len(cpu_cells) - 1} more cells are fp32-only); mixed precision "
                          "brings no speed on CPU anyway")
    return amp.auto_mixed_precision(network, amp_level=precision, dtype=ms.float16)
