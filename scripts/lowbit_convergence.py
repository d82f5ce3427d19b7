"""Convergence of low-bit gradient exchange: the same fine-tuning run on real data, fp32 vs b-bit gradients.

Each variant is one msrun launch of 2 ranks running scripts/lowbit_convergence_worker.py: `msnc finetune`'s path
(ascend_configs/vader_sst2_cpu.yaml: the pretrained MiniLM teacher on VADER binary sentiment) training the top
`--train-top-layers` encoder layers, the pooler and the classifier, the variants differing ONLY in the `comm:`
section: same seed, data subset and order, initial weights. Each launch writes its metrics.jsonl (one train record
per update: the loss curve) and results.json (dev accuracy of the final weights, test accuracy of the best-dev
model); this script collects them into OUT/summary.json, OUT/summary.md and OUT/loss_curves.png.

    python scripts/lowbit_convergence.py OUT [--train-limit 1920] [--eval-limit 500] [--batch-size 16]
        [--max-length 48] [--train-top-layers 2] [--learning-rate 2e-4] [--seed N]
        [--seeds OUT_SEED1 OUT_SEED2 ...]   (the fp32-vs-variant table over seeds, nothing run)
        [--variants fp32,b2,b2_ef,b2_noclip,b8,b4,b3,b3_ef,b3_bucket,b3_clip2.5,b3_noclip,s3,s3_ef,s3_w8,s2_w2] [--root CHECKOUT] [--plot-only]

A variant whose results.json exists is not run again (rerun after an interruption to finish the rest). `--root`
launches another checkout (e.g. a `git archive` snapshot, so edits made while the study runs cannot reach it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# name -> (label, comm overrides). clip 3 std is the default clip; warm-up 0 so every update is low-bit.
VARIANTS = {
    "fp32": ("fp32 all-reduce", {"comm.scheme": "fp32"}),
    "b8": ("8-bit, clip 3", {"comm.scheme": "allgather", "comm.gradient_bits": 8}),
    "b4": ("4-bit, clip 3", {"comm.scheme": "allgather", "comm.gradient_bits": 4}),
    "b3": ("3-bit, clip 3", {"comm.scheme": "allgather", "comm.gradient_bits": 3}),
    "b2": ("2-bit, clip 3", {"comm.scheme": "allgather", "comm.gradient_bits": 2}),
    "b2_ef": ("2-bit, clip 3, error feedback", {"comm.scheme": "allgather", "comm.gradient_bits": 2,
                                                "comm.error_feedback": "true"}),
    "b2_noclip": ("2-bit, no clip", {"comm.scheme": "allgather", "comm.gradient_bits": 2,
                                     "comm.clip_factor": "null"}),
    "b2_clip2": ("2-bit, clip 2", {"comm.scheme": "allgather", "comm.gradient_bits": 2, "comm.clip_factor": 2.0}),
    "b3_ef": ("3-bit, clip 3, error feedback", {"comm.scheme": "allgather", "comm.gradient_bits": 3,
                                                "comm.error_feedback": "true"}),
    "b3_bucket": ("3-bit, clip 3, buckets of 1024", {"comm.scheme": "allgather", "comm.gradient_bits": 3,
                                                     "comm.bucket_size": 1024}),
    "b3_clip2.5": ("3-bit, clip 2.5", {"comm.scheme": "allgather", "comm.gradient_bits": 3, "comm.clip_factor": 2.5}),
    "b3_noclip": ("3-bit, no clip", {"comm.scheme": "allgather", "comm.gradient_bits": 3,
                                     "comm.clip_factor": "null"}),
    # scheme 2: the owner updates its fp32 master shard; scales per bucket of 1024 (the scheme needs buckets)
    "s3": ("sharded, 3-bit, clip 3, fp32 weights", {"comm.scheme": "sharded", "comm.gradient_bits": 3,
                                                    "comm.bucket_size": 1024}),
    "s3_w8": ("sharded, 3-bit, clip 3, 8-bit weights", {"comm.scheme": "sharded", "comm.gradient_bits": 3,
                                                        "comm.bucket_size": 1024, "comm.weight_bits": 8}),
    "s3_ef": ("sharded, 3-bit, clip 3, error feedback, fp32 weights", {
        "comm.scheme": "sharded", "comm.gradient_bits": 3, "comm.bucket_size": 1024, "comm.error_feedback": "true"}),
    "s2_w2": ("sharded, 2-bit, clip 3, TWN weights", {"comm.scheme": "sharded", "comm.gradient_bits": 2,
                                                      "comm.bucket_size": 1024, "comm.weight_bits": 2}),
}


def run_variant(root: Path, out: Path, name: str, args, port: int) -> dict:
    target = out / name
    results = target / "results.json"
    if results.is_file():
        print(f"[{name}] already done: {results}", flush=True)
        return json.loads((target / "wall.json").read_text()) if (target / "wall.json").is_file() else {}
    overrides = {"output_dir": str(target), "data.train_limit": args.train_limit, "data.eval_limit": args.eval_limit,
                 "data.batch_size": args.batch_size, "data.max_length": args.max_length,
                 "runtime.cpu_threads": 1, "train.log_every": 1, "train.eval_every": 0, "train.save_every": 0,
                 "train.learning_rate": args.learning_rate, "comm.warmup_steps": 0, "parallel.world_size": 2,
                 **({"runtime.seed": args.seed} if args.seed is not None else {}), **VARIANTS[name][1]}
    bin_dir = Path(sys.executable).parent
    command = [str(bin_dir / "msrun"), "--worker_num=2", "--local_worker_num=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", f"--log_dir={target / 'msrun_logs'}", "--join=True",
               "--cluster_time_out=600", str(root / "scripts" / "lowbit_convergence_worker.py"),
               "--train-top-layers", str(args.train_top_layers), "--config",
               str(root / "ascend_configs" / "vader_sst2_cpu.yaml")]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    env = dict(os.environ, PATH=str(bin_dir) + os.pathsep + os.environ.get("PATH", ""))  # msrun starts `python`
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    target.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] {' '.join(command)}", flush=True)
    started = time.time()
    with open(target / "launch.log", "w", encoding="utf-8") as log:
        status = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(root)).returncode
    wall = {"wall_seconds": round(time.time() - started, 1), "returncode": status}
    (target / "wall.json").write_text(json.dumps(wall))
    if status != 0:
        print(f"[{name}] FAILED with status {status}: see {target / 'launch.log'}", flush=True)
    else:
        print(f"[{name}] done in {wall['wall_seconds']} s", flush=True)
    return wall


def collect(out: Path, names) -> list:
    rows = []
    for name in names:
        target = out / name
        if not (target / "metrics.jsonl").is_file():
            continue
        # a launch that died after training (e.g. a rank timed out by msrun's heartbeat during the evaluation on a
        # saturated machine) still has its loss curve; its accuracies are reported as missing, never guessed
        results = json.loads((target / "results.json").read_text()) if (target / "results.json").is_file() else {}
        records = [json.loads(line) for line in (target / "metrics.jsonl").read_text().splitlines() if line.strip()]
        train = [r for r in records if r["type"] == "train"]
        wall = json.loads((target / "wall.json").read_text()) if (target / "wall.json").is_file() else {}
        rows.append({
            "name": name, "label": VARIANTS[name][0],
            "updates": [r["update"] for r in train], "loss": [r["loss"] for r in train],
            "final_dev_accuracy": results.get("dev", {}).get("acc"),
            "best_dev_accuracy": results.get("best_dev", {}).get("acc"),
            "test_accuracy": results.get("test", {}).get("acc"),
            "train_seconds": results.get("train_seconds"), "wall_seconds": wall.get("wall_seconds"),
            "bytes_per_step": train[-1].get("comm_bytes_per_lowbit_step") if train else None,
            "skipped_updates": results.get("skipped_updates"),
        })
    return rows


def mean_tail(values, count):
    tail = values[-count:]
    return sum(tail) / len(tail) if tail else float("nan")


def report(out: Path, rows: list, args) -> None:
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    tail = max(1, len(rows[0]["loss"]) // 4) if rows else 1
    lines = ["| gradients | updates | first-quarter loss | last-quarter loss | final dev acc | test acc (best dev) "
             "| bytes/rank/step | train s |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        head = sum(row["loss"][:tail]) / max(1, len(row["loss"][:tail]))
        bytes_text = f"{row['bytes_per_step']:,}" if row["bytes_per_step"] else "fp32 all-reduce"
        dev, test, seconds = (f"{row[key]:.4f}" if row[key] is not None else "missing"
                              for key in ("final_dev_accuracy", "test_accuracy", "train_seconds"))
        lines.append(f"| {row['label']} | {len(row['loss'])} | {head:.4f} | {mean_tail(row['loss'], tail):.4f} | "
                     f"{dev} | {test} | {bytes_text} | {seconds} |")
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, axes = plt.subplots(1, 2, figsize=(14, 5.5))
    window = 5  # moving average over updates: one update's loss on 32 sentences is noisy
    colours = plt.get_cmap("tab20").colors  # more variants than the default cycle's 10 colours
    for index, row in enumerate(rows):
        loss = np.asarray(row["loss"], dtype=np.float64)
        style = {"label": row["label"], "color": colours[(2 * index) % 20 + (index // 10) % 2],
                 "linestyle": "--" if row["name"].startswith("s") else "-"}  # the sharded scheme dashed
        if loss.size >= window:
            smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
            axes[0].plot(row["updates"][window - 1:], smooth, **style)
        else:
            axes[0].plot(row["updates"], loss, **style)
    axes[0].set_xlabel("update")
    axes[0].set_ylabel(f"training loss (moving average of {window})")
    axes[0].set_title(f"MiniLM (top {args.train_top_layers} layers trained) on VADER SST-2, 2 ranks")
    axes[0].legend(fontsize=8)
    scored = [r for r in rows if r["final_dev_accuracy"] is not None and r["test_accuracy"] is not None]
    positions = np.arange(len(scored))
    axes[1].bar(positions - 0.2, [r["final_dev_accuracy"] for r in scored], 0.4, label="final dev")
    axes[1].bar(positions + 0.2, [r["test_accuracy"] for r in scored], 0.4, label="test (best dev)")
    axes[1].set_xticks(positions, [r["label"] for r in scored], fontsize=7, rotation=35, ha="right")
    low = min([r["final_dev_accuracy"] for r in scored] + [r["test_accuracy"] for r in scored] + [1.0])
    axes[1].set_ylim(max(0.0, low - 0.05), 1.0)
    axes[1].set_ylabel("accuracy")
    axes[1].legend(fontsize=8)
    figure.suptitle(f"train_limit {args.train_limit}, batch {args.batch_size} x 2 ranks, max_length "
                    f"{args.max_length}, 1 epoch", fontsize=9)
    figure.tight_layout()
    figure.savefig(out / "loss_curves.png", dpi=110)
    print(f"wrote {out / 'loss_curves.png'}, {out / 'summary.md'}")


def seed_table(outs) -> str:
    """fp32 vs each low-bit variant over several seeds (one study directory per seed): every accuracy, the paired
    differences to the same seed's fp32 run, and their means. Only seeds where fp32 and the variant both finished."""
    runs = {}  # variant -> seed directory -> (dev, test)
    for out in outs:
        for results in sorted(Path(out).glob("*/results.json")):
            data = json.loads(results.read_text())
            runs.setdefault(results.parent.name, {})[str(out)] = (data["dev"]["acc"], data["test"]["acc"])
    fp32 = runs.get("fp32", {})
    lines = ["| gradients | seeds | dev per seed | test per seed | dev - fp32 per seed (points) | test - fp32 per seed "
             "(points) | mean dev / test - fp32 |", "|---|---|---|---|---|---|---|"]
    for name in [name for name in VARIANTS if name in runs]:
        seeds = [out for out in map(str, outs) if out in runs[name] and out in fp32]
        if not seeds:
            continue
        dev = [runs[name][seed][0] for seed in seeds]
        test = [runs[name][seed][1] for seed in seeds]
        d_dev = [100 * (runs[name][seed][0] - fp32[seed][0]) for seed in seeds]
        d_test = [100 * (runs[name][seed][1] - fp32[seed][1]) for seed in seeds]
        lines.append(f"| {VARIANTS[name][0]} | {len(seeds)} | {' '.join(f'{v:.3f}' for v in dev)} | "
                     f"{' '.join(f'{v:.3f}' for v in test)} | {' '.join(f'{v:+.1f}' for v in d_dev)} | "
                     f"{' '.join(f'{v:+.1f}' for v in d_test)} | {sum(d_dev) / len(seeds):+.2f} / "
                     f"{sum(d_test) / len(seeds):+.2f} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--train-limit", type=int, default=1920)
    parser.add_argument("--eval-limit", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--variants", default="fp32,b2,b2_ef,b2_noclip,b8,b4,b3")
    parser.add_argument("--train-top-layers", type=int, default=2, help="6 = the whole encoder")
    parser.add_argument("--learning-rate", type=float, default=2e-4)
    parser.add_argument("--root", type=Path, default=REPO)
    parser.add_argument("--port", type=int, default=8611)
    parser.add_argument("--seed", type=int, default=None,
                        help="runtime.seed (the config's 42 if unset): the training and evaluation subsets, the "
                             "classifier's initialisation, dropout and rounding noise all follow it")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--seeds", type=Path, nargs="+", default=None, metavar="OUT",
                        help="print the paired fp32-vs-variant table over these study directories (one per seed; "
                             "the positional OUT first) and exit")
    args = parser.parse_args()
    names = [name.strip() for name in args.variants.split(",") if name.strip()]
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if args.seeds:
        print(seed_table([args.out] + list(args.seeds)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    failed = []
    if not args.plot_only:
        for index, name in enumerate(names):
            if run_variant(args.root.resolve(), args.out.resolve(), name, args, args.port + index).get("returncode"):
                failed.append(name)
    rows = collect(args.out, names)
    if rows:
        report(args.out, rows, args)
    if failed:
        print(f"failed variants: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
