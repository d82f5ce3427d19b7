"""Trains the tiny task in graph mode (resuming if a checkpoint exists) and saves the final weights.

Run as a separate process by test_trainer.py, which kills it with SIGKILL part-way and runs it again.
    python resume_worker.py OUT MAX_STEPS [ACCUMULATION SAVE_EVERY ROWS]
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
# optional: ACCUMULATION SAVE_EVERY ROWS (save_every 0 = at each epoch end, which can fall inside a cycle)
accumulation, save_every, rows = (int(a) for a in sys.argv[3:6]) if len(sys.argv) > 3 else (1, 1, 48)
trainer, model = tiny_task.build(output, max_steps=int(sys.argv[2]), save_every=save_every, rows=rows,
                                 gradient_accumulation=accumulation, eval_every=0)
trainer.fit()
np.savez(output / "final.npz", **tiny_task.weights(model))
