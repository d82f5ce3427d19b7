"""`msnc compress` and `msnc report`."""
from __future__ import annotations

import json
from pathlib import Path


def budget_overrides(config: Path, overrides, latency_ms: float, batch_size: int):
    """`--latency-ms X --batch-size B` as pipeline overrides: every DynaBERT stage selects its sub-network within
    the budget (`msnc dynabert select`, at the measurement's sequence length) instead of a fixed width, and the
    measurement times batch B, so the report's deploy choice can weigh every model (sub-networks and bit widths)."""
    from ms_nlp_compress.pipeline.runner import load_pipeline

    pipeline = load_pipeline(config, overrides)
    extra = []
    for stage in pipeline.specs():
        if stage.kind == "dynabert":
            options = {"latency_ms": float(latency_ms), "batch_size": int(batch_size),
                       "sequence_length": int(pipeline.measure.sequence_length)}
            extra.append(f"stages.{stage.name}.options=" + json.dumps(options))
    if int(batch_size) not in pipeline.measure.batch_sizes:
        extra.append("measure.batch_sizes=" + json.dumps(sorted(pipeline.measure.batch_sizes + [int(batch_size)])))
    return list(overrides) + extra


def run_compress(args) -> int:
    from ms_nlp_compress.pipeline.report import set_budget
    from ms_nlp_compress.pipeline.runner import load_pipeline, run_pipeline

    overrides = list(args.overrides)
    if args.latency_ms is not None:
        overrides = budget_overrides(Path(args.config), overrides, args.latency_ms, args.batch_size)
        if not args.no_measure:
            run_dir = Path(load_pipeline(Path(args.config), overrides).run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            set_budget(run_dir, args.latency_ms, args.batch_size)
    report = run_pipeline(Path(args.config), overrides, resume=not args.no_resume, stop_after=args.stop_after,
                          measure=not args.no_measure)
    if "models" in report:
        print((Path(report["run_dir"]) / "report.md").read_text(encoding="utf-8"))
    else:
        print(json.dumps(report))
    return 0


def run_report(args) -> int:
    from ms_nlp_compress.pipeline.report import build_report, set_budget

    if args.latency_ms is not None:
        set_budget(Path(args.run_dir), args.latency_ms, args.batch_size)
    report = build_report(Path(args.run_dir))
    print((Path(args.run_dir) / "report.md").read_text(encoding="utf-8"))
    return 0 if report["models"] else 1


def add_parser(subparsers) -> None:
    from ms_nlp_compress.pipeline.stages import known_kinds

    parser = subparsers.add_parser(
        "compress", help="the whole pipeline: teacher -> TinyBERT -> DynaBERT -> quantization -> MindIR + report",
        description="Run the stages of a pipeline config in order (kinds: " + ", ".join(known_kinds())
                    + "). A stage finished with the same config and input is skipped, an interrupted one resumes, "
                      "a changed one re-runs with the stages after it. Then every produced model is measured "
                      "(dev/test, size, MindIR, latency) and run_dir/report.md is written.")
    parser.add_argument("--config", required=True, help="the pipeline file (ascend_configs/compress_*.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a pipeline key, e.g. run_dir=runs/x or stages.1.enabled=false")
    parser.add_argument("--no-resume", action="store_true",
                        help="an interrupted stage starts over (its folder is moved aside, not deleted)")
    parser.add_argument("--stop-after", default=None, metavar="STAGE", help="stop after this stage")
    parser.add_argument("--no-measure", action="store_true", help="run the stages only; no measurement, no report")
    _budget_arguments(parser)
    parser.set_defaults(func=run_compress)
    report = subparsers.add_parser("report", help="rebuild report.md / report.json / plots of a compress run",
                                   description="Rebuild the report of a `msnc compress` run folder from its "
                                               "artifacts (pipeline.json, stage records, measure/*.json).")
    report.add_argument("run_dir")
    _budget_arguments(report)
    report.set_defaults(func=run_report)


def _budget_arguments(parser) -> None:
    parser.add_argument("--latency-ms", type=float, default=None,
                        help="deploy budget: the report picks the most accurate model (DynaBERT sub-network, bit "
                             "width) whose measured latency a call fits; kept in run_dir/deploy_budget.json")
    parser.add_argument("--batch-size", type=int, default=1, help="the batch size of the budget (default 1)")
