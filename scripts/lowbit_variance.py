"""Variance inflation of the low-bit gradient quantizer on real gradients, per bit width, with and without clipping.

Real gradients: the classification loss of the pretrained MiniLM teacher (fresh classifier head, every tensor,
22.7M entries) on real VADER SST-2 training batches. For each gradient tensor g, the
quantizer of LowBitAllGatherReducer (one scale per tensor: s = min(max|g|, c*std(g)), or max|g| without clipping;
unbiased stochastic rounding of clip(g, +-s)/s * k to integer levels, k = 2^(b-1) - 1) is drawn DRAWS times with
fresh uniforms, and over all draws:

    error ratio    E||Q(g) - g||^2 / ||g||^2         (rounding noise + clipping bias)
    inflation      E||Q(g)||^2 / ||g||^2             (second moment the optimizer sees; 1 + error for unbiased Q)
    seed bound     sum_tensors (s/k) ||clip(g)||_1 / ||g||^2   (Hou et al.: per-entry rounding variance <= step*|x|;
                                                   without clipping ~ sqrt(d) ||g||^2 / k, with clipping d-free;
                                                   it bounds the rounding part, i.e. error ratio - clip bias)
    clip bias      ||clip(g) - g||^2 / ||g||^2       (the part clipping adds; 0 without clipping)

The quantizer runs in numpy here (same maths as lowbit.py, float64) so 22.7M entries x many draws are affordable;
`--check-graph` also runs the compiled reducer (world size 1 returns this rank's dequantized codes) for one
configuration and prints its error ratio beside numpy's, which must agree within the sampling error.

    python scripts/lowbit_variance.py OUT.json [--batches 2] [--batch-size 16] [--draws 8]
        [--bits 2,3,4,8] [--check-graph]
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def quantize(values: np.ndarray, bits: int, clip_factor, rng: np.random.Generator):
    """numpy twin of lowbit.stochastic_levels with the reducer's per-tensor scale; returns (Q(g), clip(g), scale)."""
    k = float(2 ** (bits - 1) - 1)
    largest = float(np.abs(values).max())
    scale = largest if clip_factor is None else min(largest, clip_factor * float(values.std()))
    if scale == 0.0:
        return np.zeros_like(values), np.zeros_like(values), 0.0
    clipped = np.clip(values, -scale, scale)
    position = np.abs(clipped) / scale * k
    lower = np.floor(position)
    level = np.minimum(lower + (rng.random(values.shape) < position - lower), k)
    return np.sign(clipped) * level * (scale / k), clipped, scale


def layer_of(name: str) -> str:
    match = re.search(r"layers?\.(\d+)\.", name)
    if match:
        return f"layer {match.group(1)}"
    return "embeddings" if "embed" in name else "pooler + classifier"


def real_gradients(batches: int, batch_size: int, seed: int):
    """[(name, gradient float64)] per batch, from the classification loss on real VADER training sentences."""
    import mindspore as ms

    from ms_nlp_compress.config import load_config
    from ms_nlp_compress.train.finetune import build_classifier, encode, load_tokenizer_for, read_split
    from ms_nlp_compress.train.losses import SequenceClassificationLoss

    ms.set_context(mode=ms.PYNATIVE_MODE)
    ms.device_context.cpu.op_tuning.threads_num(1)
    overrides = ["data.max_length=48", f"runtime.seed={seed}"]
    config = load_config(REPO / "ascend_configs" / "vader_sst2_cpu.yaml", overrides)
    ms.set_seed(seed)
    task, examples = read_split(config, "train")
    model, _, pretrained = build_classifier(config, task.num_labels)
    tokenizer = load_tokenizer_for(config, pretrained)
    rng = np.random.default_rng(seed)
    chosen = [examples[i] for i in rng.choice(len(examples), batches * batch_size, replace=False)]
    columns = encode(chosen, tokenizer, config.data.max_length, task.is_regression)
    loss_cell = SequenceClassificationLoss(model)
    loss_cell.set_train(True)
    weights = model.trainable_params()
    grad_fn = ms.value_and_grad(loss_cell, None, weights)
    out = []
    for index in range(batches):
        rows = slice(index * batch_size, (index + 1) * batch_size)
        inputs = [ms.Tensor(columns[name][rows]) for name in ("input_ids", "attention_mask", "token_type_ids",
                                                              "label")]
        loss, grads = grad_fn(*inputs)
        out.append([(w.name, g.asnumpy().astype(np.float64)) for w, g in zip(weights, grads)])
        print(f"batch {index}: loss {float(loss.asnumpy()):.4f}", flush=True)
    return out, weights


def measure(gradients, bits_list, clip_factors, draws: int, seed: int):
    """Totals over the model and per layer group, averaged over batches."""
    rows = []
    rng = np.random.default_rng(seed + 1)
    for bits in bits_list:
        for clip in clip_factors:
            sums = OrderedDict()
            for batch in gradients:
                for name, grad in batch:
                    group = sums.setdefault(layer_of(name), np.zeros(5))
                    total = sums.setdefault("all", np.zeros(5))
                    norm = float((grad * grad).sum())
                    error = second = 0.0
                    for _ in range(draws):
                        quantized, clipped, scale = quantize(grad, bits, clip, rng)
                        error += float(((quantized - grad) ** 2).sum()) / draws
                        second += float((quantized * quantized).sum()) / draws
                    k = 2 ** (bits - 1) - 1
                    bound = scale / k * float(np.abs(clipped).sum())
                    bias = float(((clipped - grad) ** 2).sum())
                    for acc in (group, total):
                        acc += np.array([norm, error, second, bound, bias])
            for group, (norm, error, second, bound, bias) in sums.items():
                rows.append({"bits": bits, "clip_factor": clip, "group": group, "error_ratio": error / norm,
                             "inflation": second / norm, "seed_bound": bound / norm, "clip_bias": bias / norm})
            overall = next(row for row in rows[-len(sums):] if row["group"] == "all")
            print(f"{bits}-bit clip {clip}: error {overall['error_ratio']:.4f} (bound {overall['seed_bound']:.4f})",
                  flush=True)
    return rows


def graph_check(gradients, weights, bits: int, clip, draws: int):
    """The compiled reducer's own error ratio for one configuration (world size 1: Q(g) comes back)."""
    import mindspore as ms

    from ms_nlp_compress.models.dropout import set_dropout_seed
    from ms_nlp_compress.parallel.comm_config import CommConfig
    from ms_nlp_compress.parallel.lowbit import LowBitAllGatherReducer

    ms.set_context(mode=ms.GRAPH_MODE)
    set_dropout_seed(0, 0)
    reducer = LowBitAllGatherReducer(weights, CommConfig(scheme="allgather", gradient_bits=bits, clip_factor=clip),
                                     world_size=1)
    grads = gradients[0]
    inputs = ms.mutable(tuple(ms.Tensor(g.astype(np.float32)) for _, g in grads))
    norm = sum(float((g * g).sum()) for _, g in grads)
    error = 0.0
    for _ in range(draws):
        out = reducer(inputs)
        error += sum(float(((o.asnumpy().astype(np.float64) - g) ** 2).sum()) for o, (_, g) in zip(out, grads))
    return error / draws / norm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--batches", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--bits", default="2,3,4,8")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--check-graph", action="store_true")
    args = parser.parse_args()
    started = time.time()
    gradients, weights = real_gradients(args.batches, args.batch_size, args.seed)
    entries = sum(g.size for _, g in gradients[0])
    bits_list = [int(b) for b in args.bits.split(",")]
    rows = measure(gradients, bits_list, [3.0, None], args.draws, args.seed)
    result = {"model": "pretrained MiniLM-L6-H384, every tensor", "entries": int(entries),
              "tensors": len(gradients[0]), "batches": args.batches, "batch_size": args.batch_size,
              "draws": args.draws, "rows": rows}
    if args.check_graph:
        numpy_row = next(r for r in rows if r["bits"] == bits_list[0] and r["clip_factor"] == 3.0
                         and r["group"] == "all")
        result["graph_check"] = {"bits": bits_list[0], "clip_factor": 3.0, "numpy_error_ratio_all_batches":
                                 numpy_row["error_ratio"],
                                 "graph_error_ratio_batch0": graph_check(gradients, weights, bits_list[0], 3.0,
                                                                         args.draws)}
        print("graph check:", result["graph_check"], flush=True)
    result["seconds"] = round(time.time() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print("| bits | clip | group | E‖Q(g)−g‖²/‖g‖² | E‖Q(g)‖²/‖g‖² | seed bound | clip bias |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        if row["group"] == "all":
            print(f"| {row['bits']} | {row['clip_factor'] or 'none'} | {row['group']} | {row['error_ratio']:.4f} | "
                  f"{row['inflation']:.4f} | {row['seed_bound']:.4f} | {row['clip_bias']:.4f} |")
    print(f"wrote {args.out} ({result['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
