"""Trains the tiny task for a few updates, data parallel under msrun or as one process, and saves the weights.

    msrun ... dp_worker.py OUT 2     -> OUT/rank_<r>.npz from each of 2 ranks (per-rank batch 4)
    python dp_worker.py OUT 1        -> OUT/rank_0.npz from one process (batch 8 = the same global batch)
    python dp_worker.py OUT 2 die    -> rank 1 raises before training (the launcher must fail, not hang)
"""
import sys
from pathlib import Path

import numpy as np

import mindspore as ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
import tiny_task  # noqa: E402
from ms_nlp_compress.config import ExperimentConfig, NezhaConfig, ParallelConfig, RuntimeConfig, TrainConfig  # noqa
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification  # noqa: E402
from ms_nlp_compress.parallel.setup import init_data_parallel  # noqa: E402
from ms_nlp_compress.train.batches import ArrayBatches  # noqa: E402
from ms_nlp_compress.train.losses import SequenceClassificationLoss  # noqa: E402
from ms_nlp_compress.train.trainer import Trainer  # noqa: E402

output, world_size = Path(sys.argv[1]), int(sys.argv[2])
ms.set_context(mode=ms.GRAPH_MODE)
config = ExperimentConfig(
    model=NezhaConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                      max_relative_position=4, hidden_dropout=0.0, attention_dropout=0.0),
    runtime=RuntimeConfig(cpu_threads=1),
    parallel=ParallelConfig(world_size=world_size),
    train=TrainConfig(learning_rate=1e-2, max_steps=5, warmup_ratio=0.0, save_every=5, eval_every=0))
ms.device_context.cpu.op_tuning.threads_num(1)
rank, size = init_data_parallel(config.parallel, config.runtime)
if len(sys.argv) > 3 and sys.argv[3] == "die" and rank == 1:
    raise RuntimeError("rank 1 fails on purpose")
ms.set_seed(0)  # the same initial weights on every rank
model = NezhaForSequenceClassification(config.model, 2)
output.mkdir(parents=True, exist_ok=True)
np.savez(output / f"initial_{rank}.npz", **tiny_task.weights(model))
batches = ArrayBatches(tiny_task.columns(), tiny_task.ORDER, batch_size=8 // size, seed=0, rank=rank,
                       world_size=size)
trainer = Trainer(config, model, SequenceClassificationLoss(model), batches, output / "run", rank=rank,
                  world_size=size, log=lambda message: None)
trainer.fit()
output.mkdir(parents=True, exist_ok=True)
np.savez(output / f"rank_{rank}.npz", **tiny_task.weights(model))
