"""Run the stages in order, each once per (config, input model): a stage whose record matches is skipped, an
interrupted one resumes from its own checkpoints, a changed one re-runs (its old folder moved aside, not deleted),
and so do the stages after it whose input model changed. Then every produced model is measured and the report
written.

A stage's identity (`stage_hash`) is the sha256 of its kind, its resolved config (without `output_dir`, which the
pipeline sets) and the fingerprint of its input model (the previous stage's output files). The number of ranks
is `parallel.world_size` of that config, so it is part of the identity; the msrun port and time-out are not.

A stage whose launch has more than one worker runs its kind's `run_parallel`: the data-parallel command under
msrun (`msrun ... scripts/msnc_entry.py <command> --config <the stage's file> --set <the same overrides>`, so every
rank resolves exactly the config this process hashed), the rest in this process. Only this process decides what to
skip, resume or move aside; ranks never do. Records:

    run_dir/pipeline.json                 the stage list of the last invocation (the report reads it)
    run_dir/<stage>/pipeline_started.json the stage_hash of the run in progress (resume only with the same hash)
    run_dir/<stage>/pipeline_stage.json   the finished stage: stage_hash, its command's report, outputs, seconds
    run_dir/<stage>/msrun_log/            a data-parallel stage's msrun.log and worker_<rank>.log
    run_dir/previous/<stage>.<time>/      a stage folder replaced because its config or input changed
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ms_nlp_compress.atomic import write_text_atomic
from ms_nlp_compress.config import config_to_dict, load_config
from ms_nlp_compress.errors import ConfigError, MsncError
from ms_nlp_compress.pipeline.config import LaunchConfig, PipelineConfig, StageSpec, stage_config_path
from ms_nlp_compress.pipeline.measure import measure_model, model_fingerprint
from ms_nlp_compress.pipeline.report import build_report, read_record
from ms_nlp_compress.pipeline.stages import stage_kind

Log = Callable[[str], None]
STAGE_RECORD = "pipeline_stage.json"
STARTED_RECORD = "pipeline_started.json"
MSRUN_LOG = "msrun_log"


def _resolve(path: str) -> Path:
    from ms_nlp_compress.train.finetune import resolve_path

    return resolve_path(path)


def stage_hash(kind: str, config, input_fingerprint: Optional[str], options: Optional[Dict] = None,
               input_keys: Sequence[str] = ()) -> str:
    """sha256 of what a stage's result depends on. The input model enters by its content fingerprint, not by the
    path the pipeline wrote into `input_keys`, so a run folder copied or moved elsewhere is still recognised."""
    values = config_to_dict(config)
    values.pop("output_dir", None)
    if input_fingerprint is not None:
        for key in input_keys:
            *parents, leaf = key.split(".")
            section = values
            for name in parents:
                section = section.get(name) if isinstance(section, dict) else None
            if isinstance(section, dict) and leaf in section:
                section[leaf] = "<input model>"
    payload = json.dumps({"kind": kind, "config": values, "input": input_fingerprint, "options": options or {}},
                         sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()


def _move_aside(stage_dir: Path, run_dir: Path, log: Log) -> None:
    target = run_dir / "previous" / f"{stage_dir.name}.{time.strftime('%Y%m%d-%H%M%S')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(stage_dir), str(target))
    log(f"  its earlier folder (another config or input) moved to {target}")


def load_pipeline(path: Path, overrides: Sequence[str] = ()) -> PipelineConfig:
    if not Path(path).is_file():
        raise ConfigError(f"{path}: pipeline config not found")
    return load_config(path, overrides, cls=PipelineConfig)


def stage_overrides(stage: StageSpec, stage_dir: Path, input_dir: Optional[Path],
                    workers: Optional[int] = None) -> List[str]:
    """The `--set` overrides the pipeline adds to a stage's config file: the stage's own `set:`, its output folder,
    its input model and, when the launch says how many, its ranks."""
    kind = stage_kind(stage.kind)
    overrides = list(stage.set) + [f"output_dir={stage_dir}"]
    if input_dir is not None:
        overrides += [f"{key}={input_dir}" for key in kind.input_keys]
    elif kind.needs_input:
        raise ConfigError(f"stage {stage.name!r} ({stage.kind}) needs the previous stage's model, and there is none")
    if workers is not None:
        overrides.append(f"parallel.world_size={workers}")
    return overrides


def resolve_stage_config(pipeline_file: Path, stage: StageSpec, stage_dir: Path, input_dir: Optional[Path],
                         workers: Optional[int] = None):
    path = stage_config_path(pipeline_file, stage)
    overrides = stage_overrides(stage, stage_dir, input_dir, workers)
    if not path.is_file():
        raise ConfigError(f"stage {stage.name!r}: config {path} not found")
    return load_config(path, overrides)


def msrun_launcher(stage: StageSpec, config, pipeline_file: Path, overrides: Sequence[str], launch: LaunchConfig,
                   stage_dir: Path, log: Log):
    """The `launch` callable a kind's `run_parallel` gets: `launch(["distill", "task"])` runs that msnc command on
    `parallel.world_size` ranks with the stage's config file and overrides; a failure names the stage and logs."""
    from ms_nlp_compress.parallel.launch import msrun_command, parallel_settings, run_msrun

    path = stage_config_path(pipeline_file, stage)
    workers = config.parallel.world_size

    def launch_command(command: Sequence[str]) -> None:
        settings = parallel_settings(config.parallel, source=str(path), master_port=launch.master_port)
        arguments = list(command) + ["--config", str(path)]
        for item in overrides:
            arguments += ["--set", item]
        log_dir = stage_dir / MSRUN_LOG
        argv = msrun_command(workers, arguments, settings, log_dir)
        log(f"  msrun: `msnc {' '.join(command)}` on {workers} ranks (port {settings['MSNC_MASTER_PORT']}); "
            f"rank logs in {log_dir}")
        run_msrun(argv, log_dir, f"stage {stage.name!r} ({stage.kind}, `msnc {' '.join(command)}` on {workers} "
                                 "ranks)", launch.timeout_seconds)

    launch_command.workers = workers
    return launch_command


def child_launcher(stage: StageSpec, pipeline_file: Path, overrides: Sequence[str], launch: LaunchConfig, log: Log):
    """The `launch` callable of a one-worker stage run in a child process (`launch.process: child`): the same
    msnc command, config file and overrides as under msrun, on one process."""
    from ms_nlp_compress.parallel.launch import run_child

    path = stage_config_path(pipeline_file, stage)

    def launch_command(command: Sequence[str]) -> None:
        arguments = list(command) + ["--config", str(path)]
        for item in overrides:
            arguments += ["--set", item]
        log(f"  child process: `msnc {' '.join(command)}`")
        run_child(arguments, f"stage {stage.name!r} ({stage.kind}, `msnc {' '.join(command)}`)",
                  launch.timeout_seconds)

    launch_command.workers = 1
    return launch_command


def run_pipeline(pipeline_file: Path, overrides: Sequence[str] = (), resume: bool = True, log: Log = print,
                 stop_after: Optional[str] = None, measure: bool = True) -> Dict:
    """Run (or skip, or resume) every enabled stage, then measure every produced model and write the report.
    `stop_after`: a stage name to stop after (tests, partial runs). Returns the report dictionary."""
    pipeline_file = Path(pipeline_file)
    pipeline = load_pipeline(pipeline_file, overrides)
    run_dir = _resolve(pipeline.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    enabled = [stage for stage in pipeline.specs() if stage.enabled]
    write_text_atomic(run_dir / "pipeline.json", json.dumps({
        "name": pipeline.name, "pipeline_file": str(pipeline_file.resolve()), "overrides": list(overrides),
        "stages": [{"name": stage.name, "kind": stage.kind} for stage in enabled],
        "measure": config_to_dict(pipeline.measure)}, indent=2))
    started_all = time.perf_counter()
    input_dir, input_fingerprint = None, None
    eval_config = None
    produced: List[Tuple[str, str, Path]] = []  # (stage, label, model dir)
    for index, stage in enumerate(enabled, 1):
        kind = stage_kind(stage.kind)
        stage_dir = run_dir / stage.name
        header = f"[{index}/{len(enabled)}] {stage.name} ({stage.kind})"
        if kind.run is None:  # an existing model
            model_dir = _resolve(stage.model)
            if model_dir is None or not model_dir.is_dir():
                raise ConfigError(f"stage {stage.name!r}: model {stage.model} is not a directory")
            outputs = kind.outputs(stage_dir, {"model": str(model_dir)})
            log(f"{header}: {model_dir}")
        else:
            launch = pipeline.stage_launch(stage)
            overrides_of_stage = stage_overrides(stage, stage_dir, input_dir, launch.workers)
            config = resolve_stage_config(pipeline_file, stage, stage_dir, input_dir, launch.workers)
            workers = config.parallel.world_size
            if workers > 1 and kind.run_parallel is None:
                raise ConfigError(f"stage {stage.name!r}: {workers} ranks (parallel.world_size of its config), "
                                  f"but kind {stage.kind!r} has no data-parallel launch; set "
                                  f"stages.{stage.name}.launch.workers=1")
            if eval_config is None and kind.measured:
                eval_config = config
            identity = stage_hash(stage.kind, config, input_fingerprint, stage.options, kind.input_keys)
            done = read_record(stage_dir / STAGE_RECORD)
            if done is not None and done.get("stage_hash") == identity:
                report = done["report"]
                log(f"{header}: done before with this config and input ({done.get('seconds', 0):.0f} s then); "
                    "skipped")
                outputs = kind.outputs(stage_dir, report)
            else:
                started = read_record(stage_dir / STARTED_RECORD)
                if stage_dir.exists() and (done is not None or started is None
                                           or started.get("stage_hash") != identity or not resume):
                    log(f"{header}: config or input changed since {stage_dir} was made")
                    _move_aside(stage_dir, run_dir, log)
                stage_dir.mkdir(parents=True, exist_ok=True)
                resuming = (stage_dir / STARTED_RECORD).is_file()
                write_text_atomic(stage_dir / STARTED_RECORD, json.dumps({"stage_hash": identity}))
                ranks = f" ({workers} ranks under msrun)" if workers > 1 else ""
                log(f"{header}: {'resuming' if resuming else 'running'} -> {stage_dir}{ranks}")
                began = time.perf_counter()
                if workers > 1:
                    report = kind.run_parallel(config, resume, log, stage.options, msrun_launcher(
                        stage, config, pipeline_file, overrides_of_stage, launch, stage_dir, log))
                elif launch.process == "child" and kind.run_parallel is not None:
                    report = kind.run_parallel(config, resume, log, stage.options, child_launcher(
                        stage, pipeline_file, overrides_of_stage, launch, log))
                else:
                    report = kind.run(config, resume, log, stage.options)
                seconds = time.perf_counter() - began
                outputs = kind.outputs(stage_dir, report)
                write_text_atomic(stage_dir / STAGE_RECORD, json.dumps({
                    "stage_hash": identity, "kind": stage.kind, "input": str(input_dir) if input_dir else None,
                    "input_fingerprint": input_fingerprint, "report": report, "seconds": round(seconds, 1),
                    "outputs": [[label, str(path)] for label, path in outputs]}, indent=2, default=str))
                log(f"{header}: finished in {seconds:.0f} s")
        for label, path in outputs:
            if not Path(path).is_dir():
                raise MsncError(f"stage {stage.name!r}: expected model directory {path} is missing (move "
                                f"{stage_dir} away to redo the stage)")
            if kind.measured:
                produced.append((stage.name, label, Path(path)))
        input_dir = outputs[0][1]
        input_fingerprint = model_fingerprint(input_dir)
        if stop_after == stage.name:
            log(f"stopping after stage {stage.name!r} (--stop-after)")
            return {"run_dir": str(run_dir), "stopped_after": stage.name}
    if eval_config is None:
        raise ConfigError("stages: no stage has an experiment config to take the evaluation data from")
    if measure:
        from ms_nlp_compress.runtime import setup_runtime

        setup_runtime(eval_config.runtime)
        log(f"measuring {len(produced)} model(s): dev/test, size, latency, MindIR")
        for stage_name, label, model_dir in produced:
            measure_model(label, model_dir, eval_config, pipeline.measure, run_dir / stage_name / "measure", log)
    report = build_report(run_dir)
    log(f"pipeline finished in {time.perf_counter() - started_all:.0f} s; report: {run_dir / 'report.md'}")
    return report
