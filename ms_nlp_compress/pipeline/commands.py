"""`msnc compress` and `msnc report`."""
from __future__ import annotations

import json
from pathlib import Path


def run_compress(args) -> int:
    from ms_nlp_compress.pipeline.runner import run_pipeline

    report = run_pipeline(Path(args.config), args.overrides, resume=not args.no_resume, stop_after=args.stop_after,
                          measure=not args.no_measure)
    if "models" in report:
        print((Path(report["run_dir"]) / "report.md").read_text(encoding="utf-8"))
    else:
        print(json.dumps(report))
    return 0


def run_report(args) -> int:
    from ms_nlp_compress.pipeline.report import build_report

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
    parser.set_defaults(func=run_compress)
    report = subparsers.add_parser("report", help="rebuild report.md / report.json / plots of a compress run",
                                   description="Rebuild the report of a `msnc compress` run folder from its "
                                               "artifacts (pipeline.json, stage records, measure/*.json).")
    report.add_argument("run_dir")
    report.set_defaults(func=run_report)
