"""Stage kinds: how the pipeline runs a stage, wires the previous stage's model into it and finds what it produced.

A kind is data (`StageKind`), registered by name; a new algorithm joins the pipeline with one `register_stage`
call. Every kind runs an existing command's function in-process (`run_finetune`, `run_task`, ...), with the same
config file that command takes, so a stage behaves exactly as its own command does (resume, skip of finished
sub-stages, results.json).

A kind that can run data parallel also has `run_parallel`: it runs the data-parallel part of its command under
msrun through the `launch` callable the pipeline passes (`launch(["distill", "task"])` = `msnc distill task` with
the stage's config on every rank) and does the rest (a grid, a selection, an extraction) in the pipeline's process;
its report is read back from the files the command wrote (`read_results`), so a skipped, resumed or re-run stage
behaves the same whichever way it ran.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ms_nlp_compress.errors import ConfigError, MsncError

Log = Callable[[str], None]
# (resolved experiment config, resume, log, options) -> the stage's report (what its command prints / writes to
# results.json); options are the stage's `options:` mapping
RunFunction = Callable[..., Dict]
# (stage folder, the stage's report) -> [(label, model directory)]: every model the stage produced, the one the
# next stage starts from first
OutputsFunction = Callable[[Path, Dict], List[Tuple[str, Path]]]
# launch(["distill", "task"]): run that msnc command under msrun on the stage's ranks with the stage's config and
# overrides; returns when every rank finished, raises MsncError (naming the stage and the msrun logs) otherwise
Launch = Callable[[Sequence[str]], None]
# (resolved experiment config, resume, log, options, launch) -> the stage's report, as `run` returns it
ParallelRunFunction = Callable[..., Dict]


@dataclass(frozen=True)
class StageKind:
    name: str
    run: Optional[RunFunction]  # None: the stage takes an existing model (kind `model`)
    outputs: OutputsFunction
    input_keys: Tuple[str, ...] = ()  # config keys the pipeline sets to the previous stage's model directory
    needs_input: bool = False  # a stage that cannot run without a previous stage's model
    description: str = ""
    option_keys: Tuple[str, ...] = ()  # the keys its `options:` may hold
    measured: bool = True  # False: its model is passed on but not measured or reported (a pre-trained encoder)
    run_parallel: Optional[ParallelRunFunction] = None  # None: the kind runs in one process only


_KINDS: Dict[str, StageKind] = {}


def register_stage(kind: StageKind) -> StageKind:
    _KINDS[kind.name] = kind
    return kind


def stage_kind(name: str, key: str = "stage") -> StageKind:
    _register_builtins()
    if name not in _KINDS:
        raise ConfigError(f"{key}.kind: unknown stage kind {name!r}; known kinds: {', '.join(sorted(_KINDS))}")
    return _KINDS[name]


def known_kinds() -> List[str]:
    _register_builtins()
    return sorted(_KINDS)


def best_dir(stage_dir: Path, report: Dict) -> List[Tuple[str, Path]]:
    return [(stage_dir.name, stage_dir / "best")]


def read_results(config, name: str = "results.json") -> Dict:
    """The report a command wrote to `output_dir/results.json` (rank 0 writes it, the same dict its function
    returns): how a stage run under msrun hands its report back to the pipeline."""
    import json

    path = Path(config.output_dir) / name
    if not path.is_file():
        raise MsncError(f"{path}: the stage's command finished but wrote no {name}")
    return json.loads(path.read_text(encoding="utf-8"))


def resume_flag(resume: bool) -> List[str]:
    return [] if resume else ["--no-resume"]


def _run_finetune(config, resume: bool, log: Log, options: Dict) -> Dict:
    from ms_nlp_compress.train.finetune import run_finetune

    return run_finetune(config, resume=resume, log=log)


def _run_distill_task(config, resume: bool, log: Log, options: Dict) -> Dict:
    from ms_nlp_compress.compress.distill.run import run_task

    return run_task(config, resume=resume, log=log)


def command_on_ranks(*command: str) -> ParallelRunFunction:
    """A kind whose whole command is data parallel (rank 0 evaluates and writes results.json)."""

    def run(config, resume: bool, log: Log, options: Dict, launch: Launch) -> Dict:
        launch(list(command) + resume_flag(resume))
        return read_results(config)

    return run


_BUILTINS_DONE = False


def _register_builtins() -> None:
    global _BUILTINS_DONE
    if _BUILTINS_DONE:
        return
    _BUILTINS_DONE = True
    register_stage(StageKind(
        "model", None, lambda stage_dir, report: [(stage_dir.name, Path(report["model"]))],
        description="an existing model directory (e.g. a teacher fine-tuned elsewhere), measured and passed on"))
    register_stage(StageKind(
        "finetune", _run_finetune, best_dir, input_keys=("pretrained",),
        description="msnc finetune: the teacher (best dev model in best/)",
        run_parallel=command_on_ranks("finetune")))
    register_stage(StageKind(
        "distill_task", _run_distill_task, best_dir, input_keys=("distill.teacher",), needs_input=True,
        description="msnc distill task: TinyBERT stage 1 + 2 from the previous model as teacher",
        run_parallel=command_on_ranks("distill", "task")))
    for module in ("ms_nlp_compress.compress.dynabert.pipeline_stage", "ms_nlp_compress.compress.quant.pipeline_stage",
                   "ms_nlp_compress.train.pipeline_stage"):
        _register_optional(module)


def _register_optional(module: str) -> None:
    """Algorithms that ship a `pipeline_stage` module register their kinds there (imported on first lookup)."""
    import importlib

    try:
        importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name != module:
            raise
