"""Low-bit exchange under msrun (2 CPU ranks); test_lowbit_msrun.py launches it and checks the files it writes.

    msrun ... lowbit_worker.py OUT exchange   -> OUT/exchange_<r>.npz: each rank's gradients, scales and reduced
                                                 means for a few calls of two reducers (the test recomputes the
                                                 means with a numpy twin of both ranks' codes), then
                                                 OUT/train_<r>.npz: weights after 4 Trainer updates with the
                                                 low-bit reducer (error feedback, 1 fp32 warm-up step)
    msrun ... lowbit_worker.py OUT die        -> rank 1 exits after its first exchange while rank 0 waits in the
                                                 second one: the launch must fail, not hang
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
from ms_nlp_compress.models.dropout import set_dropout_seed  # noqa: E402
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification  # noqa: E402
from ms_nlp_compress.parallel.comm_config import CommConfig  # noqa: E402
from ms_nlp_compress.parallel.lowbit import LowBitAllGatherReducer  # noqa: E402
from ms_nlp_compress.parallel.sharded import ShardedLowBitUpdate  # noqa: E402
from ms_nlp_compress.parallel.setup import init_data_parallel  # noqa: E402
from ms_nlp_compress.train.batches import ArrayBatches  # noqa: E402
from ms_nlp_compress.train.losses import SequenceClassificationLoss  # noqa: E402
from ms_nlp_compress.train.trainer import Trainer  # noqa: E402

SHAPES = [(7, 5), (13,), (3, 4, 6), (1,)]
SEED = 0


class Scales(nn.Cell):
    def __init__(self, reducer):
        super().__init__()
        self.reducer = reducer

    def construct(self, grads):
        return self.reducer.scales(self.reducer.fuse(grads))


class Barrier(nn.Cell):
    """A final small collective: a rank must not exit while its peer's last collective is in flight."""

    def __init__(self):
        super().__init__()
        self.gather = ops.AllGather()

    def construct(self, x):
        return self.gather(x)


def parameters():
    return [ms.Parameter(Tensor(np.zeros(shape, np.float32)), name=f"p{i}") for i, shape in enumerate(SHAPES)]


def gradients(rank, call):
    rng = np.random.default_rng(100 * rank + call)
    return [rng.standard_t(3, size=shape).astype(np.float32) for shape in SHAPES]


def exchange(reducer, rank, calls, record, prefix, die_after=None):
    for call in range(calls):
        grads = gradients(rank, call)
        corrected = grads
        if reducer.error_feedback:  # the scales the reducer will use are those of g + residual
            residual = reducer.residual.asnumpy()
            flat = np.concatenate([g.reshape(-1) for g in grads]) + residual[:reducer.layout.total]
            corrected, start = [], 0
            for shape in SHAPES:
                size = int(np.prod(shape))
                corrected.append(flat[start:start + size].reshape(shape).astype(np.float32))
                start += size
        record[f"{prefix}_scales_{call}"] = Scales(reducer)(ms.mutable(tuple(Tensor(g) for g in corrected))).asnumpy()
        out = reducer(ms.mutable(tuple(Tensor(g) for g in grads)))
        record[f"{prefix}_grads_{call}"] = np.concatenate([g.reshape(-1) for g in grads])
        record[f"{prefix}_mean_{call}"] = np.concatenate([o.asnumpy().reshape(-1) for o in out])
        if die_after is not None and call + 1 == die_after:
            raise RuntimeError(f"rank {rank} fails on purpose after exchange {call + 1}")


def main():
    output, mode = Path(sys.argv[1]), sys.argv[2]
    ms.set_context(mode=ms.GRAPH_MODE)
    ms.device_context.cpu.op_tuning.threads_num(1)
    config = ExperimentConfig(
        model=NezhaConfig(vocab_size=30, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32,
                          max_relative_position=4, hidden_dropout=0.1, attention_dropout=0.0),
        runtime=RuntimeConfig(cpu_threads=1), parallel=ParallelConfig(world_size=2),
        train=TrainConfig(learning_rate=1e-2, max_steps=4, warmup_ratio=0.0, save_every=0, eval_every=0))
    rank, size = init_data_parallel(config.parallel, config.runtime)
    set_dropout_seed(SEED, rank)  # what start_run does: per-rank rounding noise and dropout masks
    output.mkdir(parents=True, exist_ok=True)
    record = {}
    first = LowBitAllGatherReducer(parameters(), CommConfig(scheme="allgather", gradient_bits=2, clip_factor=3.0,
                                                            error_feedback=True), size)
    exchange(first, rank, 3 if mode != "die" else 2, record, "tensor2", die_after=1 if rank == 1 and mode == "die"
             else None)
    second = LowBitAllGatherReducer(parameters(), CommConfig(scheme="allgather", gradient_bits=3, bucket_size=64),
                                    size)
    exchange(second, rank, 1, record, "bucket3")
    np.savez(output / f"exchange_{rank}.npz", **record)

    # scheme 2: 4-bit gradients, buckets of 64 (rank r owns bucket r), TWN weights, SGD 0.1, two updates
    rng = np.random.default_rng(7)  # the same initial weights on both ranks
    weights = [ms.Parameter(Tensor(rng.normal(size=shape).astype(np.float32)), name=f"w{i}")
               for i, shape in enumerate(SHAPES)]
    sharded_record = {"initial": np.concatenate([w.asnumpy().reshape(-1) for w in weights])}
    sharded = ShardedLowBitUpdate(weights, CommConfig(scheme="sharded", gradient_bits=4, bucket_size=64,
                                                      weight_bits=2), size, rank, learning_rate=0.1)
    for call in range(2):
        grads = gradients(rank, 10 + call)
        inputs = ms.mutable(tuple(Tensor(g) for g in grads))
        sharded_record[f"grads_{call}"] = np.concatenate([g.reshape(-1) for g in grads])
        sharded_record[f"scales_{call}"] = Scales(sharded.exchange)(inputs).asnumpy()
        sharded(inputs)
        sharded_record[f"weights_{call}"] = np.concatenate([w.asnumpy().reshape(-1) for w in weights])
    sharded_record["master"] = sharded.master.asnumpy()
    np.savez(output / f"sharded_{rank}.npz", **sharded_record)

    ms.set_seed(0)  # the same initial weights on every rank
    model = NezhaForSequenceClassification(config.model, 2)
    np.savez(output / f"initial_{rank}.npz", **tiny_task.weights(model))
    # the `comm:` section alone selects the exchange: the Trainer builds the reducer from it
    config.comm = CommConfig(scheme="allgather", gradient_bits=2, error_feedback=True, warmup_steps=1,
                             bucket_size=256)
    batches = ArrayBatches(tiny_task.columns(), tiny_task.ORDER, batch_size=4, seed=0, rank=rank, world_size=size)
    trainer = Trainer(config, model, SequenceClassificationLoss(model), batches, output / "run", rank=rank,
                      world_size=size, log=lambda message: None)
    reducer = trainer.reducer
    assert isinstance(reducer, LowBitAllGatherReducer), type(reducer)
    trainer.fit()
    np.savez(output / f"train_{rank}.npz", **tiny_task.weights(model))
    (output / f"comm_{rank}.json").write_text(json.dumps(reducer.comm_stats()))
    Barrier()(Tensor(np.ones(1, np.float32)))


if __name__ == "__main__":
    main()
