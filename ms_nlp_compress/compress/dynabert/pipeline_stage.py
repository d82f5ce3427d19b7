"""DynaBERT as a `msnc compress` stage: train (importance, rewiring, width then width+depth stages), evaluate
every sub-network (grid), then extract ONE sub-network as the stage's model: the most accurate within
`options.latency_ms` per batch of `options.batch_size` on this machine (`msnc dynabert select`), or the fixed
`options.width` / `options.depth` (default 0.5 / 1.0). Input: the previous stage's fine-tuned classifier as
`dynabert.teacher_model`."""
from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Dict

from ms_nlp_compress.pipeline.stages import StageKind, register_stage

CHOSEN_DIR = "chosen"


def run_stage(config, resume: bool, log, options: Dict) -> Dict:
    from ms_nlp_compress.compress.dynabert.run import run_train

    return choose(config, run_train(config, resume=resume, log=log), log, options)


def run_stage_parallel(config, resume: bool, log, options: Dict, launch) -> Dict:
    """`msnc dynabert train` data parallel under msrun; grid, selection and extraction once, in this process."""
    from ms_nlp_compress.pipeline.stages import read_results, resume_flag

    launch(["dynabert", "train"] + resume_flag(resume))
    # The grid, the selection and the extraction run in this one process: the same config on one rank (a shallow
    # copy keeps what the file said; its config.yaml record then says world_size 1, results.json keeps the ranks).
    single = copy.copy(config)
    single.parallel = dataclasses.replace(config.parallel, world_size=1)
    return choose(single, read_results(config), log, options)


def choose(config, train_report: Dict, log, options: Dict) -> Dict:
    from ms_nlp_compress.compress.dynabert.run import extract_to, run_grid, run_select, trained_model_dir

    report = {"train": train_report}
    grid = run_grid(config, log=log)
    report["grid"] = {key: grid[key] for key in grid if key != "entries"}
    if "latency_ms" in options:
        selected = run_select(config, float(options["latency_ms"]), int(options.get("batch_size", 1)),
                              sequence_length=options.get("sequence_length"), log=log)
        report["select"] = selected
        width, depth = selected["selected"]["width"], selected["selected"]["depth"]
    else:
        width, depth = float(options.get("width", 0.5)), float(options.get("depth", 1.0))
    target = Path(config.output_dir) / CHOSEN_DIR
    report["chosen"] = extract_to(trained_model_dir(config), width, depth, target, log=log)
    log(f"dynabert: chose {report['chosen']['name']} -> {target}")
    return report


register_stage(StageKind(
    "dynabert", run_stage, lambda stage_dir, report: [(stage_dir.name, stage_dir / CHOSEN_DIR)],
    input_keys=("dynabert.teacher_model",), needs_input=True,
    option_keys=("width", "depth", "latency_ms", "batch_size", "sequence_length"),
    run_parallel=run_stage_parallel,
    description="msnc dynabert train + grid + select/extract: one sub-network passed on"))
