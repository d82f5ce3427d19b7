"""DynaBERT training-step benchmark: compile time of the sub-network graphs and time of one full update.

    python scripts/bench_dynabert_step.py --shape tiny
    python scripts/bench_dynabert_step.py --shape minilm --seq 128 --batch 8 --steps 3

One full update = one `TrainStep` call on `DynaBertLoss`: forward + backward of every (width, depth) sub-network of
one batch against the teacher, the summed gradient clipped to norm 1.0, one AdamW step. Reported:
- `forward compile`: first eval call of each sub-network Cell (one graph per sub-network), then its steady time;
- `teacher forward`: the teacher alone (one forward; the loss graph calls it once per sub-network unless the
  compiler merges the identical calls, which `step - sum(sub-network train cost)` tells);
- `train step`: first call (compile of the one graph holding every sub-network, plus one step; with
  `--graph separate` the engine's TrainStep compiles one gradient graph per sub-network instead) and the median
  of `--steps` further calls;
- with `--separate`, the alternative design for comparison: one gradient graph per sub-network (compiled one by
  one), called in turn with the gradients summed on the device by a jitted HyperMap add (the clip and the optimizer
  step, identical in both designs, are not included).
Weights are random: timing depends on shapes only (`--shape minilm` is all-MiniLM-L6-v2's: 6 layers, 12 heads of
32, hidden 384, FFN 1536, BERT absolute positions). Wall-clock on whatever machine runs it; threads per --threads.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mindspore as ms  # noqa: E402
from mindspore import ParameterTuple, Tensor, nn, ops  # noqa: E402

from ms_nlp_compress.compress.dynabert.elastic import ElasticModel  # noqa: E402
from ms_nlp_compress.compress.dynabert.loss import DynaBertLoss  # noqa: E402
from ms_nlp_compress.config import NezhaConfig  # noqa: E402
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification  # noqa: E402
from ms_nlp_compress.train.step import TrainStep  # noqa: E402

SHAPES = {
    "tiny": dict(vocab_size=100, hidden_size=16, num_layers=4, num_heads=4, intermediate_size=32,
                 max_relative_position=8),
    "minilm": dict(vocab_size=30522, hidden_size=384, num_layers=6, num_heads=12, intermediate_size=1536,
                   max_position_embeddings=512, position_embedding="absolute"),
}


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    if isinstance(result, tuple):
        result[0].asnumpy()
    return result, time.perf_counter() - start


class SubnetworkGradients(nn.Cell):
    """One sub-network's (loss, gradients) as its own compiled graph (the --separate design)."""

    def __init__(self, distiller, weights):
        super().__init__(auto_prefix=False)
        self.grad_fn = ms.value_and_grad(distiller, None, weights, has_aux=True)

    def construct(self, *inputs):
        (loss, _), grads = self.grad_fn(*inputs)
        return loss, grads


_add = ops.HyperMap()


@ms.jit
def add_gradients(total, grads):
    return _add(ops.add, total, grads)


def time_separate(loss, weights, inputs, steps):
    cells = [SubnetworkGradients(distiller, weights) for distiller in loss.distillers]
    compile_seconds = 0.0
    for cell in cells:
        compile_seconds += timed(cell, *inputs)[1]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        total = cells[0](*inputs)[1]
        for cell in cells[1:]:
            total = add_gradients(total, cell(*inputs)[1])
        total[0].asnumpy()
        times.append(time.perf_counter() - start)
    print(f"separate gradient graphs ({len(cells)}): compile + first call {compile_seconds:.1f} s in total, "
          f"steady {statistics.median(times):.3f} s per summed gradient (median of {steps})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--widths", default="1.0,0.75,0.5,0.25")
    parser.add_argument("--depths", default="1.0,0.75,0.5")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="CPU", help="MindSpore device_target (CPU, Ascend, GPU)")
    parser.add_argument("--separate", action="store_true", help="also time one gradient graph per sub-network")
    parser.add_argument("--graph", default="single", choices=("single", "separate"),
                        help="dynabert.graph of the timed TrainStep: one graph over every sub-network (single, this "
                             "script's original measurement) or the engine's one gradient graph per sub-network")
    args = parser.parse_args()
    ms.set_context(mode=ms.GRAPH_MODE, device_target=args.device)
    if args.device == "CPU":
        ms.device_context.cpu.op_tuning.threads_num(args.threads)
    ms.set_seed(0)
    widths = [float(w) for w in args.widths.split(",")]
    depths = [float(d) for d in args.depths.split(",")]
    config = NezhaConfig(**SHAPES[args.shape])
    teacher = NezhaForSequenceClassification(config, 2, output_hidden_states=True)
    student = NezhaForSequenceClassification(config, 2, output_hidden_states=True)
    elastic = ElasticModel(student)
    rng = np.random.default_rng(0)
    inputs = (Tensor(rng.integers(1, config.vocab_size, (args.batch, args.seq)).astype(np.int32)),
              Tensor(np.ones((args.batch, args.seq), np.int32)), Tensor(np.zeros((args.batch, args.seq), np.int32)))
    print(f"shape {args.shape}, batch {args.batch}, seq {args.seq}, widths {widths}, depths {depths}, "
          f"{len(widths) * len(depths)} sub-networks, device {args.device}, threads {args.threads}")

    teacher.set_train(False)
    _, compile_seconds = timed(teacher, *inputs)
    times = [timed(teacher, *inputs)[1] for _ in range(args.steps)]
    print(f"teacher forward: compile+run {compile_seconds:.2f} s, steady {statistics.median(times) * 1e3:.1f} ms")
    total_compile = 0.0
    for depth in depths:
        for width in widths:
            sub = elastic.subnetwork(width, depth, hidden_states=True)
            sub.set_train(False)
            _, compile_seconds = timed(sub, *inputs)
            total_compile += compile_seconds
            times = [timed(sub, *inputs)[1] for _ in range(args.steps)]
            print(f"  {elastic.shape(width, depth).name:>12}: forward compile+run {compile_seconds:.2f} s, "
                  f"steady {statistics.median(times) * 1e3:.1f} ms")
    print(f"sub-network forward graphs: {total_compile:.1f} s compile+first run in total")

    loss = DynaBertLoss(elastic, teacher, sorted(widths, reverse=True), sorted(depths, reverse=True),
                        graph=args.graph)
    labels = Tensor(np.zeros(args.batch, np.int32))
    if args.separate:
        loss.set_train(True)
        time_separate(loss, ParameterTuple(student.trainable_params()), inputs + (labels,), args.steps)
    optimizer = nn.AdamWeightDecay(student.trainable_params(), learning_rate=2e-5, eps=1e-8, weight_decay=0.0)
    step = TrainStep(loss, optimizer, max_grad_norm=1.0)
    step.set_train(True)
    start = time.perf_counter()
    step(*inputs, labels)
    first = time.perf_counter() - start
    times = []
    for _ in range(args.steps):
        start = time.perf_counter()
        step(*inputs, labels)
        times.append(time.perf_counter() - start)
    print(f"train step over {len(loss.distillers)} sub-networks: first call (compile + step) {first:.1f} s, "
          f"steady {statistics.median(times):.3f} s per update (median of {args.steps})")


if __name__ == "__main__":
    main()
