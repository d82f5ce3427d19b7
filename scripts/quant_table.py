"""The compress/quant/README.md results table and plot, read from `msnc quantize` output directories.

    .venv/bin/python scripts/quant_table.py [--plot OUT.png] [--fp32 LABEL=EVAL_JSON ...] LABEL=RUN_DIR [...]

Each RUN_DIR is an `msnc quantize` (or `--ptq`) output directory: its results.json (dev / test of `best/` as loaded
from disk, the export's byte-exact sizes and reload check) and, when present, weight_only_eval.json (written as
`scripts/quant_eval_teacher.py 300 RUN_DIR/best --weight-only > RUN_DIR/weight_only_eval.json`) and latency.json
(`msnc quantize-latency --save`: a second table). `--fp32 LABEL=FILE`: a `scripts/quant_eval_teacher.py` JSON for
the fp32 reference rows (plotted at the fp32 MindIR size of the runs whose teacher is its model_dir). Prints one
markdown row per directory; with --plot, test accuracy against MindIR megabytes (log axis), one marker per row.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _pair(text: str):
    label, sep, path = text.partition("=")
    if not sep or not label or not path:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LABEL=PATH")
    return label, Path(path)


LATENCY_KINDS = ("packed", "decoded", "weightonly", "mindir")  # msnc quantize-latency's cases besides fp32


def _json(path: Path):
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def latency_row(r: dict) -> str:
    """fp32 ms, then each serving form's ms (x fp32), at batch 1 and 32, from the run's latency.json."""
    cases, ratio = r["latency"]["cases"], r["latency"]["ratio_to_fp32"]  # ratio: median over median, per batch
    cells = []
    for batch in (1, 32):
        cells.append(f"{cases[f'fp32_b{batch}']['median_ms']:,.1f}")
        for kind in LATENCY_KINDS:
            name = f"{kind}_b{batch}"
            cells.append(f"{cases[name]['median_ms']:,.1f} ({ratio[name]:.2f})" if name in cases else "-")
    return f"| {r['label']} | " + " | ".join(cells) + " |"


def row(label: str, run: Path) -> dict:
    path = run / "results.json"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (did `msnc quantize` finish for {label}?)")
    result = json.loads(path.read_text(encoding="utf-8"))
    size = result["export"]["size"]
    qat = result.get("stages", {}).get("qat", {})
    return {"label": label, "dev": result["dev"]["acc"], "test": result["test"]["acc"],
            "dir_bytes": size["model_dir_weights"]["file_bytes"],
            "dir_ratio": size["model_dir_weights"]["ratio_to_fp32"],
            "mindir_bytes": size["mindir"]["file_bytes"], "mindir_ratio": size["mindir"]["ratio_to_fp32"],
            "fp32_dir_bytes": size["model_dir_weights"]["fp32_file_bytes"],
            "fp32_mindir_bytes": size["mindir"]["fp32_file_bytes"], "updates": qat.get("updates"),
            "best_update": qat.get("best_update"), "teacher": Path(result["teacher"]).resolve(),
            "reload_diff": result["export"]["verify"]["max_abs_difference"],
            "latency": _json(run / "latency.json"), "weight_only": _json(run / "weight_only_eval.json")}


def _span(values) -> str:
    low, high = min(values), max(values)
    return f"{low:,}" if low == high else f"{low:,} - {high:,}"


def fp32_sizes(label: str, scores: dict, rows: list):
    """(model.safetensors bytes, the set of fp32 MindIR sizes) of the fp32 model an eval JSON scored, from the runs
    quantized from it (their export reports). Each run exports the fp32 reference itself: the MindIR's node names
    carry the process's graph counters, so its size varies by a few KB between runs; the weights file does not."""
    mine = [r for r in rows if r["teacher"] == Path(scores["model_dir"]).resolve()]
    if not mine:
        raise SystemExit(f"--fp32 {label}: no run among the arguments was quantized from {scores['model_dir']}")
    dir_bytes = {r["fp32_dir_bytes"] for r in mine}
    if len(dir_bytes) != 1:
        raise SystemExit(f"--fp32 {label}: the runs from {scores['model_dir']} disagree on its weights file size")
    return f"{dir_bytes.pop():,}", {r["fp32_mindir_bytes"] for r in mine}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=_pair, help="LABEL=RUN_DIR")
    parser.add_argument("--fp32", action="append", default=[], type=_pair, help="LABEL=EVAL_JSON")
    parser.add_argument("--plot", type=Path, default=None)
    args = parser.parse_args(argv)
    rows = [row(label, run) for label, run in args.runs]
    fp32 = [(label, json.loads(path.read_text(encoding="utf-8"))) for label, path in args.fp32]
    print("| row | dev | test | model.safetensors (x smaller) | MindIR (x smaller) | updates (best) | reload max diff "
          "| weight-only serving dev / test |")
    print("|---|---|---|---|---|---|---|---|")
    references = [(label, scores, fp32_sizes(label, scores, rows)) for label, scores in fp32]
    for label, scores, (dir_bytes, mindir_bytes) in references:
        print(f"| {label} | {scores['dev']['acc']:.3f} | {scores['test']['acc']:.3f} | {dir_bytes} | "
              f"{_span(mindir_bytes)} | - | - | - |")
    for r in rows:
        updates = "PTQ" if r["updates"] is None else f"{r['updates']} ({r['best_update']})"
        served = r["weight_only"]
        served = "-" if served is None else f"{served['dev']['acc']:.3f} / {served['test']['acc']:.3f}"
        print(f"| {r['label']} | {r['dev']:.3f} | {r['test']:.3f} | {r['dir_bytes']:,} ({r['dir_ratio']:.2f}x) | "
              f"{r['mindir_bytes']:,} ({r['mindir_ratio']:.2f}x) | {updates} | {r['reload_diff']:.2g} | {served} |")
    timed = [r for r in rows if r["latency"] is not None]
    if timed:
        print("\n| row (ms, x fp32 of the same run) | " + " | ".join(
            f"{kind} b{batch}" for batch in (1, 32) for kind in ("fp32",) + LATENCY_KINDS) + " |")
        print("|---" * (1 + 2 * (1 + len(LATENCY_KINDS))) + "|")
        for r in timed:
            print(latency_row(r))
    if args.plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(10, 5))
        markers = "osD^vP<>Xph"  # rows at one file size differ by marker and colour: a legend, no overlapping labels
        for index, r in enumerate(rows):
            axis.scatter(r["mindir_bytes"] / 1e6, r["test"], s=36, marker=markers[index % len(markers)],
                         label=f"{r['label']} ({r['dev']:.3f} / {r['test']:.3f})")
        for label, scores, (_, mindir_bytes) in references:
            mindir_mb = max(mindir_bytes) / 1e6
            axis.scatter(mindir_mb, scores["test"]["acc"], marker="*", s=110, color="black")
            axis.annotate(label, (mindir_mb, scores["test"]["acc"]), fontsize=8, xytext=(-8, 6),
                          textcoords="offset points", ha="right")
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5), title="row (dev / test)",
                    title_fontsize=8)
        axis.set_xscale("log")
        axis.set_xlabel("MindIR file (MB, log scale)")
        axis.set_ylabel("test accuracy (300 rows)")
        axis.set_title("TernaryBERT / 8-bit on VADER: accuracy vs deployed file size")
        axis.grid(alpha=0.3)
        figure.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.plot, dpi=130)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
