"""Trains the tiny task with the low-bit reducer (error feedback on) in one process, resuming from the Trainer's
checkpoint if there is one, and saves the final weights and reducer state. test_lowbit_resume.py kills it with
SIGKILL after its first checkpoint and runs it again.

    python lowbit_resume_worker.py OUT MAX_STEPS
With world size 1 the reducer's "exchange" returns this rank's own dequantized codes: the quantizer, its noise
stream, the residual and the warm-up counter all run, so their checkpointing is what this exercises.
"""
import sys
from pathlib import Path

import numpy as np

import mindspore as ms

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
import tiny_task  # noqa: E402
from ms_nlp_compress.config import ExperimentConfig, NezhaConfig, TrainConfig  # noqa: E402
from ms_nlp_compress.models.dropout import set_dropout_seed  # noqa: E402
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification  # noqa: E402
from ms_nlp_compress.parallel.comm_config import CommConfig  # noqa: E402
from ms_nlp_compress.parallel.lowbit import LowBitAllGatherReducer  # noqa: E402
from ms_nlp_compress.train.batches import ArrayBatches  # noqa: E402
from ms_nlp_compress.train.losses import SequenceClassificationLoss  # noqa: E402
from ms_nlp_compress.train.trainer import Trainer  # noqa: E402

ms.set_context(mode=ms.GRAPH_MODE)
ms.device_context.cpu.op_tuning.threads_num(1)
output, max_steps = Path(sys.argv[1]), int(sys.argv[2])
ms.set_seed(0)
set_dropout_seed(0)
model_config = NezhaConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                           max_relative_position=4, hidden_dropout=0.1, attention_dropout=0.1)
config = ExperimentConfig(model=model_config, train=TrainConfig(learning_rate=3e-3, max_steps=max_steps, save_every=1,
                                                                eval_every=0, warmup_ratio=0.25))
model = NezhaForSequenceClassification(model_config, 2)
reducer = LowBitAllGatherReducer(model.trainable_params(), CommConfig(scheme="allgather", gradient_bits=2,
                                                                      clip_factor=2.0, error_feedback=True,
                                                                      warmup_steps=1), world_size=1)
batches = ArrayBatches(tiny_task.columns(), tiny_task.ORDER, batch_size=8, seed=0)
trainer = Trainer(config, model, SequenceClassificationLoss(model), batches, output, log=lambda message: None,
                  reducer=reducer)
trainer.fit()
np.savez(output / "final.npz", residual=reducer.residual.asnumpy(), exchanges=reducer.exchanges.asnumpy(),
         stream=reducer.noise.rng_counter.asnumpy(), **tiny_task.weights(model))
