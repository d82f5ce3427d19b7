"""`msnc dynabert importance | train | extract | grid | select` (compress/dynabert/run.py).

    msnc dynabert importance --config X.yaml [--set k=v ...]        score + rewire the teacher: <output_dir>/rewired
    msnc dynabert train --config X.yaml [--no-resume]                stages width, width_depth: <output_dir>/dynabert
    msnc dynabert extract --config X.yaml --width W --depth D [--output DIR] [--model DIR]
    msnc dynabert grid --config X.yaml [--measure [--batch-sizes 1,32] [--seq 128] [--repeat R]]
                                                                     dev/test per (w, d): grid.json, grid*.png;
                                                                     --measure: extract + time each, size, speedup
    msnc dynabert select --config X.yaml --latency-ms X --batch-size B [--seq N] [--repeat R]

`select` prints one JSON line (the selected sub-network and every candidate's measured latency) and one human line.
MindSpore is imported inside the command, so `msnc --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import sys

from ms_nlp_compress.bench.latency import int_list


def _config(args: argparse.Namespace):
    from ms_nlp_compress.config import load_config

    return load_config(args.config, args.overrides)


def _runtime(config) -> None:
    from ms_nlp_compress.runtime import setup_runtime

    setup_runtime(config.runtime)


def run_command(args: argparse.Namespace) -> int:
    from ms_nlp_compress.compress.dynabert import run

    config = _config(args)
    command = args.dynabert_command
    if command == "importance":
        report = run.run_importance(config)
    elif command == "train":
        report = run.run_train(config, resume=not args.no_resume)
    elif command == "extract":
        _runtime(config)
        report = run.run_extract(config, args.width, args.depth, args.output, args.model)
    elif command == "grid":
        report = run.run_grid(config, args.model, measure=args.measure, batch_sizes=args.batch_sizes,
                              sequence_length=args.seq or 128, repeat=args.repeat)
    else:
        _runtime(config)
        report = run.run_select(config, args.latency_ms, args.batch_size, args.model, args.seq, args.repeat,
                                log=lambda message: print(message, file=sys.stderr))
        chosen = report["selected"]
        print(json.dumps(report))
        print(f"selected {chosen['name']} (width {chosen['width']:g}, depth {chosen['depth']:g}): dev acc "
              f"{chosen['dev']['acc']:.4f}, {chosen['latency_ms']:.1f} ms per batch of {report['batch_size']} x "
              f"{report['sequence_length']} (budget {report['latency_budget_ms']:g} ms), {chosen['model_dir']}")
        return 0
    print(json.dumps(report, indent=2))
    return 0


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "dynabert", help="DynaBERT: width/depth-adaptive training, extraction and selection of sub-networks",
        description="DynaBERT (the `dynabert:` config section): importance + rewiring, two training stages, any "
                    "(width, depth) extracted as an ordinary model, the accuracy grid, latency-budget selection.")
    commands = parser.add_subparsers(dest="dynabert_command", required=True)
    helps = {
        "importance": "score heads and FFN neurons of the fine-tuned teacher on held-out training rows and rewire "
                      "it: <output_dir>/rewired",
        "train": "stage width (DynaBERT_W) then width_depth (DynaBERT), resumable, finished stages skipped: "
                 "<output_dir>/dynabert and results.json",
        "extract": "write the (--width, --depth) sub-network as an ordinary model directory",
        "grid": "dev/test accuracy of every trained (width, depth): grid.json, grid.png (accuracy vs FLOPs); "
                "--measure adds size, latency and speedup of every extracted sub-network",
        "select": "time the extracted sub-networks here and pick the most accurate within --latency-ms",
    }
    for name, text in helps.items():
        command = commands.add_parser(name, help=text, description=text)
        command.add_argument("--config", required=True)
        command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
        if name == "train":
            command.add_argument("--no-resume", action="store_true", help="ignore checkpoints in output_dir")
        if name in ("extract", "grid", "select"):
            command.add_argument("--model", default=None,
                                 help="the trained DynaBERT model directory (default <output_dir>/dynabert)")
        if name == "extract":
            command.add_argument("--width", type=float, required=True)
            command.add_argument("--depth", type=float, required=True)
            command.add_argument("--output", default=None, help="default <output_dir>/extracted/w<W>_d<D>")
        if name == "grid":
            command.add_argument("--measure", action="store_true",
                                 help="also extract every sub-network and time it here: latency, size, speedup vs "
                                      "FLOPs, grid_latency.png and grid_size.png")
            command.add_argument("--batch-sizes", type=int_list, default=[1, 32], help="with --measure (1,32)")
        if name == "select":
            command.add_argument("--latency-ms", type=float, required=True, help="budget per batch")
            command.add_argument("--batch-size", type=int, required=True)
        if name in ("grid", "select"):
            command.add_argument("--seq", type=int, default=None,
                                 help="timed sequence length (default: grid 128, select data.max_length)")
            command.add_argument("--repeat", type=int, default=5, help="timed forwards per candidate (median)")
        command.set_defaults(func=run_command)
