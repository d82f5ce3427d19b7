"""Apply a RuntimeConfig to MindSpore: device, execution mode, threads, fusion, compile cache, seed.

Device is a config value. Nothing here silently assumes CPU: each CPU-only knob is applied only when the device is
cpu, and each Ascend-only one only on ascend.
"""
from __future__ import annotations

import os
from typing import Optional

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


_cpu_threads_set = None  # what this process set, since MindSpore accepts the setting once and cannot report it


def set_cpu_threads(count: int) -> None:
    """Set the CPU op thread count (MindSpore's default of 25 oversubscribes small machines).

    MindSpore takes the setting once per process ("can not be set repeatedly") and cannot report it. Asking again
    for the count this module already set is fine; asking for another one, or a value MindSpore refuses, is an error
    naming runtime.cpu_threads; a count set earlier by other code (unknown to us) is kept with a warning. Never a
    silent no-op: a run would otherwise go on with a thread count nobody chose.
    """
    global _cpu_threads_set
    import sys

    from ms_nlp_compress.errors import ConfigError

    if _cpu_threads_set == count:
        return
    configured = getattr(ms.device_context.cpu.op_tuning, "RuntimeConf", None)
    if _cpu_threads_set is None and configured is not None and \
            configured.get_instance().is_op_threads_num_configured():
        print(f"warning: runtime.cpu_threads={count} not applied: this process already set MindSpore's CPU thread "
              "count elsewhere (it can be set once per process)", file=sys.stderr)
        return
    try:
        ms.device_context.cpu.op_tuning.threads_num(count)
    except (AttributeError, RuntimeError, TypeError, ValueError) as err:
        already = f" (this process already set {_cpu_threads_set})" if _cpu_threads_set is not None else ""
        raise ConfigError(f"runtime.cpu_threads: MindSpore refused {count} threads{already}: {err}; the thread "
                          "count can be set once per process, so run a new process to change it") from None
    _cpu_threads_set = count


AMP_DTYPES = {"float16": ms.float16, "bfloat16": ms.bfloat16}


def device_of_context() -> str:
    """The config spelling (cpu, ascend, gpu) of MindSpore's current device target."""
    target = str(ms.get_context("device_target"))
    return next((device for device, name in _DEVICE_TARGETS.items() if name == target), target.lower())


def apply_precision(network, precision: str, device: Optional[str] = None, amp_dtype: str = "float16"):
    """The network to run at `runtime.precision`: fp32 returns `network` itself; O1, O2 and O3 return a copy of
    it that shares every Parameter object (float32 masters, same names) and computes in `amp_dtype`.

    Differentiate and run the RETURNED cell; keep optimizing, checkpointing and saving the original model, whose
    Parameters are the same objects and which itself still computes in float32 (evaluation, export).
    `device` is `runtime.device` (None: MindSpore's current device target); `amp_dtype` is `runtime.amp_dtype`.

    Policy per level (models/precision.py has the details; the network's own code, e.g. a loss, stays float32):
    - O1: every matmul (nn.Dense, attention scores and context, the MLM decoder) in `amp_dtype`, the rest float32.
    - O2: the models in `amp_dtype` except LayerNorm, softmax and the CPU GELU (float32); outputs float32.
    - O3: the models entirely in `amp_dtype` (the CPU LayerNorm / GELU formulations excepted); outputs float32.
    All three work with `model.kernels` fused and cpu. On CPU it runs but is not faster (docs/mindspore.md): it is
    meant for Ascend, and the CPU path is how it is tested. bfloat16 needs `device: ascend` (MindSpore 2.10 has no
    CPU bfloat16 kernels: "Kernel select failed").
    """
    from ms_nlp_compress.errors import ConfigError

    if precision == "fp32":
        return network
    from ms_nlp_compress.config import PRECISIONS
    from ms_nlp_compress.models.precision import mixed_precision_copy

    if precision not in PRECISIONS:
        raise ConfigError(f"runtime.precision: must be one of {PRECISIONS}, got {precision!r}")
    if amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"runtime.amp_dtype: must be one of {tuple(AMP_DTYPES)}, got {amp_dtype!r}")
    device = device or device_of_context()
    if amp_dtype == "bfloat16" and device != "ascend":
        raise ConfigError(f"runtime.amp_dtype: bfloat16 needs device ascend (device is {device}; MindSpore has no "
                          "bfloat16 kernels there); use float16")
    return mixed_precision_copy(network, precision, AMP_DTYPES[amp_dtype])
