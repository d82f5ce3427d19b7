"""2 msrun ranks, error feedback on: an interrupted run resumed from its checkpoint vs an uninterrupted one.
test_lowbit_rank_resume.py launches it twice (fresh processes, so nothing survives in memory between the halves):

    msrun ... lowbit_rank_resume_worker.py OUT first   -> OUT/reference: STEPS updates, uninterrupted;
                                                          OUT/victim: stopped after STOP_AFTER updates (its last
                                                          checkpoint is at update SAVE_EVERY, so the resume replays
                                                          an update past it)
    msrun ... lowbit_rank_resume_worker.py OUT resume  -> OUT/missing (the test's copy of the victim's checkpoints
                                                          without rank 1's file) must be refused by both ranks;
                                                          then OUT/victim is resumed to STEPS updates

Each finished run writes OUT/<run>/final_<rank>.npz: the model weights and this rank's reducer state.
"""
import json
import sys
from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "train"))
import tiny_task  # noqa: E402
from ms_nlp_compress.config import ExperimentConfig, NezhaConfig, ParallelConfig, RuntimeConfig, TrainConfig  # noqa
from ms_nlp_compress.errors import CheckpointError  # noqa: E402
from ms_nlp_compress.models.dropout import set_dropout_seed  # noqa: E402
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification  # noqa: E402
from ms_nlp_compress.parallel.comm_config import CommConfig  # noqa: E402
from ms_nlp_compress.parallel.lowbit import LowBitAllGatherReducer  # noqa: E402
from ms_nlp_compress.parallel.setup import init_data_parallel  # noqa: E402
from ms_nlp_compress.train.batches import ArrayBatches  # noqa: E402
from ms_nlp_compress.train.losses import SequenceClassificationLoss  # noqa: E402
from ms_nlp_compress.train.trainer import Trainer  # noqa: E402

SEED = 0
STEPS, SAVE_EVERY, STOP_AFTER = 5, 2, 3


class Barrier(nn.Cell):
    """A final small collective: a rank must not exit while its peer's last collective is in flight."""

    def __init__(self):
        super().__init__()
        self.gather = ops.AllGather()

    def construct(self, x):
        return self.gather(x)


def make_trainer(output: Path, rank: int, size: int):
    config = ExperimentConfig(
        model=NezhaConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                          max_relative_position=4, hidden_dropout=0.1, attention_dropout=0.0),
        runtime=RuntimeConfig(cpu_threads=1), parallel=ParallelConfig(world_size=2),
        train=TrainConfig(learning_rate=1e-2, max_steps=STEPS, warmup_ratio=0.0, save_every=SAVE_EVERY,
                          eval_every=0, keep_checkpoints=1))
    config.runtime.seed = SEED
    # 2-bit, one scale per 256 entries, error feedback, one fp32 warm-up update: every piece of reducer state moves
    config.comm = CommConfig(scheme="allgather", gradient_bits=2, error_feedback=True, warmup_steps=1,
                             bucket_size=256)
    ms.set_seed(SEED)  # the same initial weights on every rank and in every run
    model = NezhaForSequenceClassification(config.model, 2)
    batches = ArrayBatches(tiny_task.columns(), tiny_task.ORDER, batch_size=4, seed=SEED, rank=rank, world_size=size)
    trainer = Trainer(config, model, SequenceClassificationLoss(model), batches, output, rank=rank, world_size=size,
                      log=lambda message: None)
    assert isinstance(trainer.reducer, LowBitAllGatherReducer) and trainer.reducer.per_rank_state
    return trainer, model


def record(trainer, model, rank):
    reducer = trainer.reducer
    np.savez(trainer.output_dir / f"final_{rank}.npz", residual=reducer.residual.asnumpy(),
             exchanges=reducer.exchanges.asnumpy(), stream=reducer.noise.rng_counter.asnumpy(),
             **tiny_task.weights(model))


def main():
    output, mode = Path(sys.argv[1]), sys.argv[2]
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.device_context.cpu.op_tuning.threads_num(1)
    rank, size = init_data_parallel(ParallelConfig(world_size=2), RuntimeConfig(cpu_threads=1))
    set_dropout_seed(SEED, rank)  # what start_run does: per-rank rounding noise and dropout masks
    if mode == "first":
        trainer, model = make_trainer(output / "victim", rank, size)
        result = trainer.fit(stop_after=STOP_AFTER)
        assert result.updates == STOP_AFTER, result
        trainer, model = make_trainer(output / "reference", rank, size)
        trainer.fit(resume=False)
        record(trainer, model, rank)
    else:
        trainer, _ = make_trainer(output / "missing", rank, size)
        try:
            trainer.resume()
            refusal = None
        except CheckpointError as err:
            refusal = str(err)
        (output / f"refusal_{rank}.json").write_text(json.dumps({"message": refusal}))
        trainer, model = make_trainer(output / "victim", rank, size)
        result = trainer.fit()
        assert result.resumed_from is not None and result.updates == STEPS, result
        record(trainer, model, rank)
    Barrier()(Tensor(np.ones(1, np.float32)))


if __name__ == "__main__":
    main()
