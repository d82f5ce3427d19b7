"""Trains the tiny task in graph mode (resuming if a checkpoint exists) and saves the final weights.

Run as a separate process by test_trainer.py, which kills it with SIGKILL part-way and runs it again.
"""
import sys
from pathlib import Path

import numpy as np

import mindspore as ms

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny_task  # noqa: E402

ms.set_context(mode=ms.GRAPH_MODE)
ms.device_context.cpu.op_tuning.threads_num(1)
output = Path(sys.argv[1])
trainer, model = tiny_task.build(output, max_steps=int(sys.argv[2]), save_every=1)
trainer.fit()
np.savez(output / "final.npz", **tiny_task.weights(model))
