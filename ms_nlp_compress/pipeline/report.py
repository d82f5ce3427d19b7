"""`report.md` + `report.json` + Pareto plots, rebuilt from a run folder's artifacts alone (`msnc report RUN_DIR`):
`pipeline.json` (stage order), each stage's `pipeline_stage.json` (its command's report and wall time) and
`measure/<label>.json` (what measure.py measured). Editing an artifact and rebuilding changes the report: nothing
here is remembered from the run itself.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.bench.latency import best_within_budget
from ms_nlp_compress.errors import MsncError

# The reference's published headline ratios (algorithms.md Part B 6), printed beside ours.
SEED_HEADLINES = [
    ("TinyBERT4 vs BERT-base", "7.5x smaller, 9.4x faster inference", "TinyBERT/README.md"),
    ("TernaryBERT (2-bit weights) vs BERT-base", "418 MB -> 28 MB, 14.9x smaller", "TernaryBERT-MindSpore README"),
    ("TinyBERT-MindSpore 4L-384 on SST-2", "accuracy 0.9028 (Ascend), 15M parameters, 74 MB checkpoint",
     "TinyBERT-MindSpore/README.md"),
]


def read_record(path: Path) -> Optional[Dict]:
    """A pipeline JSON record, or None when absent; a corrupt one is an error naming the file."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise MsncError(f"{path}: unreadable pipeline record ({err}); move the folder away to redo the stage")


def _metric(metrics: Optional[Dict]) -> Optional[float]:
    """The task's headline number: accuracy, else the first metric."""
    if not metrics:
        return None
    for key in ("acc", "acc_and_f1", "mcc", "corr", "pearson"):
        if key in metrics:
            return float(metrics[key])
    return float(next(iter(metrics.values())))


BUDGET_FILE = "deploy_budget.json"


def choose_for_budget(rows: List[Dict], latency_ms: float, batch_size: int) -> Dict:
    """The deployable choice under a latency budget: of the measured models whose median latency at `batch_size`
    is within `latency_ms` on this machine, the one with the best dev metric (ties: the faster, then the smaller).
    Every model the pipeline produced competes: DynaBERT sub-networks and bit widths alike."""
    if not latency_ms > 0:
        raise MsncError(f"--latency-ms must be > 0, got {latency_ms}")
    key = str(int(batch_size))
    timed = [row for row in rows if key in row.get("latency_ms", {})]
    if not timed:
        measured = sorted({size for row in rows for size in row.get("latency_ms", {})}, key=int)
        raise MsncError(f"no model was timed at batch {batch_size} (measured batch sizes: "
                        f"{', '.join(measured) or 'none'}); add it to measure.batch_sizes and rerun")
    scored = [row for row in timed if row.get("dev_metric") is not None]
    fits = [row for row in scored if row["latency_ms"][key] <= latency_ms]
    result = {"latency_ms": float(latency_ms), "batch_size": int(batch_size),
              "fits": [row["label"] for row in fits], "chosen": None}
    best = best_within_budget(scored, latency_ms, lambda row: row["latency_ms"][key], lambda row: row["dev_metric"],
                              lambda row: row["model_dir_bytes"])
    if best is None:
        fastest = min(timed, key=lambda row: row["latency_ms"][key])
        result["reason"] = (f"no model within {latency_ms:g} ms at batch {batch_size}; the fastest is "
                            f"{fastest['label']} at {fastest['latency_ms'][key]:.1f} ms")
        return result
    result.update(chosen=best["label"], dev=best["dev_metric"], test=best.get("test_metric"),
                  chosen_latency_ms=best["latency_ms"][key], model_dir=best.get("model_dir"),
                  reason=f"best dev of {len(fits)} model(s) within the budget")
    return result


def collect(run_dir: Path) -> Dict:
    run_dir = Path(run_dir)
    pipeline = read_record(run_dir / "pipeline.json")
    if pipeline is None:
        raise MsncError(f"{run_dir}: no pipeline.json (not a `msnc compress` run folder)")
    rows: List[Dict] = []
    stages = []
    for stage in pipeline["stages"]:
        stage_dir = run_dir / stage["name"]
        record = read_record(stage_dir / "pipeline_stage.json")
        stages.append({"name": stage["name"], "kind": stage["kind"],
                       "seconds": record.get("seconds") if record else None,
                       "status": "done" if record or stage["kind"] == "model" else "not finished"})
        for path in sorted((stage_dir / "measure").glob("*.json")):
            measured = json.loads(path.read_text(encoding="utf-8"))
            measured["stage"] = stage["name"]
            measured["kind"] = stage["kind"]
            rows.append(measured)
    if rows:
        reference = rows[0]  # the first model (the teacher) is what the ratios compare against
        ref_test = _metric(reference.get("test")) or _metric(reference.get("dev"))
        for row in rows:
            row["dev_metric"] = _metric(row.get("dev"))
            row["test_metric"] = _metric(row.get("test"))
            mine = row["test_metric"] if row["test_metric"] is not None else row["dev_metric"]
            row["accuracy_kept"] = (mine / ref_test) if (mine is not None and ref_test) else None
            row["size_ratio"] = reference["model_dir_bytes"] / row["model_dir_bytes"]
            if "mindir" in row and "mindir" in reference:
                row["mindir_ratio"] = reference["mindir"]["bytes"] / row["mindir"]["bytes"]
            row["speedup"] = {size: reference["latency_ms"][size] / value
                              for size, value in row.get("latency_ms", {}).items()
                              if size in reference.get("latency_ms", {}) and value > 0}
    report = {"name": pipeline["name"], "run_dir": str(run_dir), "stages": stages, "models": rows,
              "measure": pipeline.get("measure"), "seed_headlines": SEED_HEADLINES}
    budget = read_record(run_dir / BUDGET_FILE)
    if budget is not None and rows:
        report["deploy_choice"] = choose_for_budget(rows, budget["latency_ms"], budget["batch_size"])
    return report


def pareto_front(points):
    """Indices of the points no other point beats on both axes (smaller x, higher y)."""
    front = []
    for i, (x, y) in enumerate(points):
        if not any((ox <= x and oy >= y) and (ox < x or oy > y) for j, (ox, oy) in enumerate(points) if j != i):
            front.append(i)
    return front


def plot(report: Dict, run_dir: Path) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report["models"] if (row.get("test_metric") or row.get("dev_metric")) is not None]
    if not rows:
        return []
    written = []
    largest = None
    if rows[0].get("latency_ms"):
        largest = max(rows[0]["latency_ms"], key=int)
    axes_specs = [("pareto_size.png", "model directory (MB)", lambda row: row["model_dir_bytes"] / 1e6)]
    if largest is not None:
        axes_specs.append(("pareto_latency.png", f"latency at batch {largest} (ms, this machine)",
                           lambda row: row["latency_ms"].get(largest, float("nan"))))
    for file_name, x_label, x_of in axes_specs:
        points = [(x_of(row), row["test_metric"] if row["test_metric"] is not None else row["dev_metric"])
                  for row in rows]
        front = set(pareto_front(points))
        figure, axis = plt.subplots(figsize=(6.4, 4.4))
        for index, ((x, y), row) in enumerate(zip(points, rows)):
            axis.scatter([x], [y], color="tab:red" if index in front else "tab:blue", zorder=3)
            axis.annotate(row["label"], (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ordered = sorted(points[i] for i in front)
        axis.plot([p[0] for p in ordered], [p[1] for p in ordered], color="tab:red", alpha=0.5,
                  label="Pareto front")
        axis.set_xscale("log")
        axis.set_xlabel(x_label)
        axis.set_ylabel("test accuracy" if rows[0]["test_metric"] is not None else "dev accuracy")
        axis.set_title(f"{report['name']}: accuracy vs {x_label.split(' (')[0]}")
        axis.grid(True, alpha=0.3)
        axis.legend(loc="lower right")
        figure.tight_layout()
        figure.savefig(run_dir / file_name, dpi=120)
        plt.close(figure)
        written.append(file_name)
    return written


def _fmt(value, digits=3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(report: Dict, plots: List[str]) -> str:
    rows = report["models"]
    sizes = sorted({size for row in rows for size in row.get("latency_ms", {})}, key=int)
    seq = (report.get("measure") or {}).get("sequence_length")
    lines = [f"# {report['name']}", "", f"Run folder: `{report['run_dir']}`. Rebuild: `msnc report {report['run_dir']}`.",
             "", "## Models", ""]
    header = ["model", "stage", "dev", "test", "kept", "params", "dir MB", "MindIR MB", "smaller"]
    header += [f"b{size} ms" for size in sizes] + [f"b{size} speedup" for size in sizes]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["label"], f"{row['stage']} ({row['kind']})", _fmt(row.get("dev_metric")),
                 _fmt(row.get("test_metric")),
                 "-" if row.get("accuracy_kept") is None else f"{100 * row['accuracy_kept']:.1f}%",
                 f"{row['parameters'] / 1e6:.2f}M", f"{row['model_dir_bytes'] / 1e6:.2f}",
                 f"{row['mindir']['bytes'] / 1e6:.2f}" if "mindir" in row else "-",
                 f"{row['size_ratio']:.2f}x"]
        cells += [_fmt(row.get("latency_ms", {}).get(size), 1) for size in sizes]
        cells += [f"{row['speedup'][size]:.2f}x" if size in row.get("speedup", {}) else "-" for size in sizes]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", f"Ratios are against the first model. Latency: median of the measured calls at sequence {seq} on "
              "the machine that ran the pipeline (graph mode, the stage config's CPU threads).", ""]
    choice = report.get("deploy_choice")
    if choice:
        lines += ["## Deploy choice", "",
                  f"Budget: {choice['latency_ms']:g} ms a call at batch {choice['batch_size']} on this machine "
                  f"(sequence {seq}). Within it: {', '.join(choice['fits']) or 'none'}."]
        if choice["chosen"]:
            lines += [f"Chosen: **{choice['chosen']}** (dev {_fmt(choice['dev'])}, test {_fmt(choice.get('test'))}, "
                      f"{choice['chosen_latency_ms']:.1f} ms): `{choice['model_dir']}`."]
        else:
            lines += [f"Chosen: none ({choice['reason']})."]
        lines += [""]
    lines += ["## Stages", "", "| stage | kind | status | wall s |", "|---|---|---|---|"]
    for stage in report["stages"]:
        lines.append(f"| {stage['name']} | {stage['kind']} | {stage['status']} | {_fmt(stage['seconds'], 0)} |")
    lines += ["", "## The reference's headline figures (for comparison)", "", "| claim | value | source |",
              "|---|---|---|"]
    lines += [f"| {claim} | {value} | {source} |" for claim, value, source in report["seed_headlines"]]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in plots]
    return "\n".join(lines) + "\n"


def set_budget(run_dir: Path, latency_ms: float, batch_size: int) -> None:
    """Keep the deploy budget with the run, so `msnc report RUN_DIR` rebuilds the same choice."""
    write_text_atomic(Path(run_dir) / BUDGET_FILE,
                      json.dumps({"latency_ms": float(latency_ms), "batch_size": int(batch_size)}))


def build_report(run_dir: Path) -> Dict:
    run_dir = Path(run_dir)
    report = collect(run_dir)
    plots = plot(report, run_dir)
    report["plots"] = plots
    write_text_atomic(run_dir / "report.json", json.dumps(report, indent=2, default=str))
    write_text_atomic(run_dir / "report.md", markdown(report, plots))
    return report
