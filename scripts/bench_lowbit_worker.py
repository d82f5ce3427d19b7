"""One msrun rank of scripts/bench_lowbit_network.sh: MiniLM-shaped training steps with fp32 all-reduce, the
low-bit all-gather exchange (scheme 1) or the sharded worker/server update (scheme 2, `--scheme sharded`: the
engine's update cell with the owner's Adam and `--weight-bits` weights), timed under several loopback rates set by
rank 0 between phases.

Runs inside a private network namespace (the shell script creates it), so the only traffic on its loopback is this
job's. For each phase (a tc rate, or `none` for unthrottled): rank 0 sets the qdisc, all ranks meet at a barrier,
run `--steps` timed train steps (after one untimed step), and rank 0 reads the loopback byte counters
(/sys/class/net/lo/statistics, i.e. `ip -s link show lo` inside the namespace) before and after. Writes one JSON
line per phase to `--out` (rank 0).
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import numpy as np

import mindspore as ms
from mindspore import Tensor, nn, ops


# minilm: MiniLM-L6-H384 (BERT vocabulary): 22.7M parameters, 90.9 MB of fp32 gradients.
# minilm-2l: the same layer shape, 2 layers and an 8192-word vocabulary (6.7M parameters, 26.8 MB), for machines
# where two MiniLM ranks do not fit (memory, shared cores).
SHAPES = {
    "minilm": dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536),
    "minilm-2l": dict(vocab_size=8192, hidden_size=384, num_layers=2, num_heads=12, intermediate_size=1536),
    # small: 0.74M parameters (2.94 MB of fp32 gradients): byte counts on a shared machine in seconds per launch
    "small": dict(vocab_size=2048, hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
}


def loopback_bytes() -> dict:
    stats = Path("/sys/class/net/lo/statistics")
    return {key: int((stats / key).read_text()) for key in ("tx_bytes", "tx_packets")}


def set_rate(rate: str) -> None:
    """tbf on the namespace's loopback (rate like 100mbit, 1gbit), or no qdisc for `none`."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)  # absent is fine
    if rate != "none":
        subprocess.run(["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb",
                        "latency", "100ms"], check=True)


class Barrier(nn.Cell):
    def __init__(self):
        super().__init__()
        self.gather = ops.AllGather()

    def construct(self, x):
        return self.gather(x)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, required=True, help="32 = fp32 all-reduce; 2..8 = low-bit all-gather")
    parser.add_argument("--rates", default="none,1gbit,100mbit")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="minilm")
    parser.add_argument("--scheme", choices=("allgather", "sharded"), default="allgather",
                        help="exchange for --bits 2..8 (32 is always the fp32 all-reduce)")
    parser.add_argument("--weight-bits", default="same",
                        help="sharded: bits of the gathered weights (2 = TWN, 3..8), 'same' = --bits, 'fp32'")
    parser.add_argument("--bucket", type=int, default=1024, help="sharded: entries per scale (whole buckets per "
                        "shard)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    from mindspore.communication import get_group_size, get_rank, init

    from ms_nlp_compress.config import NezhaConfig
    from ms_nlp_compress.models.dropout import set_dropout_seed
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification
    from ms_nlp_compress.parallel.comm_config import CommConfig
    from ms_nlp_compress.parallel.lowbit import LowBitAllGatherReducer
    from ms_nlp_compress.parallel.sharded import ShardedLowBitUpdate
    from ms_nlp_compress.train.losses import SequenceClassificationLoss
    from ms_nlp_compress.train.step import TrainStep, make_reducer

    ms.set_context(mode=ms.GRAPH_MODE)
    ms.device_context.cpu.op_tuning.threads_num(1)
    init()
    rank, size = get_rank(), get_group_size()
    set_dropout_seed(0, rank)
    ms.set_seed(0)
    config = NezhaConfig(position_embedding="absolute", hidden_dropout=0.1, attention_dropout=0.1,
                         **SHAPES[args.shape])
    model = NezhaForSequenceClassification(config, 2)
    params = model.trainable_params()
    sharded = args.bits != 32 and args.scheme == "sharded"
    weight_bits = None
    if sharded:
        named = {"same": args.bits, "fp32": None}
        weight_bits = named[args.weight_bits] if args.weight_bits in named else int(args.weight_bits)
        comm = CommConfig(scheme="sharded", gradient_bits=args.bits, weight_bits=weight_bits, bucket_size=args.bucket)
        update = ShardedLowBitUpdate(params, comm, size, rank, optimizer="adam", max_grad_norm=1.0)
        step = TrainStep(SequenceClassificationLoss(model), None, update_cell=update, learning_rate=lambda t: 1e-5)
    else:
        optimizer = nn.AdamWeightDecay(params, learning_rate=1e-5)
        if args.bits == 32:
            reducer = make_reducer(params, size)
        else:
            reducer = LowBitAllGatherReducer(params, CommConfig(scheme="allgather", gradient_bits=args.bits), size)
        step = TrainStep(SequenceClassificationLoss(model), optimizer, reducer=reducer, max_grad_norm=1.0)
    step.set_train()
    rng = np.random.default_rng(rank)
    ids = Tensor(rng.integers(1000, config.vocab_size, (args.batch, args.seq)).astype(np.int32))
    mask = Tensor(np.ones((args.batch, args.seq), np.int32))
    types = Tensor(np.zeros((args.batch, args.seq), np.int32))
    labels = Tensor(rng.integers(0, 2, args.batch).astype(np.int32))
    barrier = Barrier()
    token = Tensor(np.ones(1, np.float32))
    compile_started = time.perf_counter()
    step(ids, mask, types, labels)  # compile + first step
    compile_seconds = time.perf_counter() - compile_started
    gradient_bytes = 4 * sum(int(np.prod(p.shape)) for p in params)
    legs = update.bytes_per_step() if sharded else None
    handed = gradient_bytes if args.bits == 32 else legs["lowbit"] if sharded else reducer.bytes_per_step()["lowbit"]
    for rate in args.rates.split(","):
        barrier(token).asnumpy()
        if rank == 0:
            set_rate(rate)
        barrier(token).asnumpy()
        step(ids, mask, types, labels)  # untimed: first step at this rate
        barrier(token).asnumpy()
        before = loopback_bytes() if rank == 0 else None
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            result = step(ids, mask, types, labels)
            times.append(time.perf_counter() - started)
        barrier(token).asnumpy()
        if rank == 0:
            after = loopback_bytes()
            record = {"shape": args.shape, "bits": args.bits, "rate": rate, "ranks": size, "batch_per_rank": args.batch,
                      "seq": args.seq, "steps": args.steps, "step_seconds": times,
                      "median_step_seconds": statistics.median(times),
                      "loopback_tx_bytes_per_step": (after["tx_bytes"] - before["tx_bytes"]) / args.steps,
                      "loopback_tx_packets_per_step": (after["tx_packets"] - before["tx_packets"]) / args.steps,
                      "bytes_handed_per_rank_per_step": handed, "fp32_gradient_bytes": gradient_bytes,
                      "compile_and_first_step_seconds": compile_seconds, "last_loss": result.loss,
                      "scheme": "fp32" if args.bits == 32 else args.scheme, "weight_bits": weight_bits,
                      "bytes_by_leg": legs}
            with open(args.out, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            print(json.dumps(record), flush=True)
    if rank == 0:
        set_rate("none")
    barrier(token).asnumpy()  # nobody exits while a peer's last collective is in flight


if __name__ == "__main__":
    main()
