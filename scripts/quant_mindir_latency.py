"""Latency of the exported MiniLM-shape 2-2-8 MindIR files of scripts/quant_minilm_size.py (8-bit position recipe):
inlined graph (q1.mindir) vs shared graph functions (q1_shared.mindir), GraphCell compiled once for dynamic shapes,
1 thread, interleaved runs, median.

    .venv/bin/python scripts/quant_minilm_size.py OUT --mindir && .venv/bin/python scripts/quant_mindir_latency.py OUT
"""
import sys, time
import numpy as np
import mindspore as ms
from mindspore import nn, Tensor
ms.device_context.cpu.op_tuning.threads_num(1)
root = sys.argv[1]
graphs = {}
for name in ("q1", "q1_shared"):
    graph = nn.GraphCell(ms.load(f"{root}/{name}.mindir"))
    graph.set_inputs(*[Tensor(shape=[None, None], dtype=ms.int32) for _ in range(3)])
    graphs[name] = graph
rng = np.random.default_rng(0)
for batch, length in ((1, 64), (32, 64)):
    inputs = [Tensor(rng.integers(1, 30000, (batch, length)).astype(np.int32)),
              Tensor(np.ones((batch, length), np.int32)), Tensor(np.zeros((batch, length), np.int32))]
    outputs = {name: graph(*inputs).asnumpy() for name, graph in graphs.items()}  # warm-up / compile
    times = {name: [] for name in graphs}
    for _ in range(15 if batch == 1 else 5):
        for name, graph in graphs.items():
            start = time.perf_counter(); graph(*inputs).asnumpy(); times[name].append(time.perf_counter() - start)
    medians = ", ".join(f"{name} median {np.median(t) * 1e3:.1f} ms" for name, t in times.items())
    print(f"batch {batch} x {length}: {medians}; max |diff| {np.abs(outputs['q1'] - outputs['q1_shared']).max():.2e}")
