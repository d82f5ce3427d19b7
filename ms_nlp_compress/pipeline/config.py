"""The pipeline file: an ordered list of stages, each naming an ordinary experiment config (the same file its own
command takes) plus `--set` overrides, and how the produced models are measured.

```yaml
name: compress_vader_cpu
run_dir: runs/compress_vader_cpu
stages:                     # in order; each key is the stage's folder under run_dir
  teacher: {kind: finetune, config: vader_sst2_cpu.yaml}
  tinybert: {kind: distill_task, config: tinybert_vader_cpu.yaml}
measure: {batch_sizes: [1, 32], sequence_length: 128}
launch: {workers: 1}        # data parallel: a stage with workers > 1 runs under msrun (per stage: stages.<name>.launch)
```

Stages are a mapping, not a list, so `--set stages.tinybert.enabled=false` or
`--set "stages.tinybert.set=[train.epochs=2]"` address one stage by name.

Stage config paths are relative to the pipeline file. Each stage's `output_dir` is `run_dir/<name>`, and its input
model (the teacher of a distillation, the model DynaBERT or QAT start from) is the previous stage's output model:
the pipeline sets those keys, so the stage configs need not know where they run.

`launch:` (and a stage's own `launch:`, which overrides it key by key) says how many data-parallel ranks run a
stage: `workers` unset takes the stage config's `parallel.world_size`; set, it becomes that key of the stage
config (so it is part of the stage's identity: N ranks with per-rank batch b are not bit-identical to one process).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from ms_nlp_compress.errors import ConfigError


@dataclass
class LaunchConfig:
    """How a stage runs: one worker in a child process (default) or in the pipeline's own process, or under msrun
    with `workers` ranks on this node."""

    workers: Optional[int] = None  # None: the stage config's parallel.world_size (1 unless it says otherwise)
    master_port: Optional[int] = None  # msrun's master port; None: the stage config's parallel.master_port
    timeout_seconds: Optional[float] = None  # stop a stage's msrun after this long (None: no limit)
    # one-worker stages: `child` runs the stage's msnc command in a child process, so what the stage held (compiled
    # graphs, its teacher) goes back to the system when it ends (measured on the VADER quick preset: 22.7 GB peak
    # RSS with all four stages in one process); `same` runs it in the pipeline's own process (tests, debugging)
    process: str = "child"

    def validate(self, prefix: str = "launch") -> None:
        if self.process not in ("child", "same"):
            raise ConfigError(f"{prefix}.process: 'child' or 'same', got {self.process!r}")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"{prefix}.workers: at least 1, got {self.workers}")
        if self.master_port is not None and not 0 < self.master_port < 65536:
            raise ConfigError(f"{prefix}.master_port: not a port: {self.master_port}")
        if self.timeout_seconds is not None and self.timeout_seconds <= 0:
            raise ConfigError(f"{prefix}.timeout_seconds: must be > 0, got {self.timeout_seconds:g}")

    def merged(self, overrides: Dict[str, Any], prefix: str) -> "LaunchConfig":
        """This launch with a stage's `launch:` keys replaced, typed and validated (errors name `prefix.<key>`)."""
        from ms_nlp_compress.config import from_mapping

        typed = from_mapping(LaunchConfig, overrides, prefix)
        resolved = dataclasses.replace(self, **{name: getattr(typed, name) for name in overrides})
        resolved.validate(prefix)
        return resolved


@dataclass
class StageSpec:
    kind: str = ""  # a registered stage kind: model, finetune, distill_task, dynabert, quantize
    config: Optional[str] = None  # the stage's experiment config file (relative to the pipeline file)
    set: List[str] = field(default_factory=list)  # extra `key=value` overrides, as with --set
    model: Optional[str] = None  # kind `model`: an existing model directory taken as this stage's output
    enabled: bool = True  # false: the stage is skipped and the next one takes this stage's input
    options: Dict[str, Any] = field(default_factory=dict)  # the kind's own choices (e.g. dynabert width/depth)
    launch: Dict[str, Any] = field(default_factory=dict)  # LaunchConfig keys replacing the pipeline's `launch:`
    name: str = field(default="", metadata={"internal": True})  # its key in `stages` (set on load)

    def validate(self, prefix: str) -> None:
        if not self.name or "/" in self.name or self.name.startswith(".") or self.name == "previous":
            raise ConfigError(f"{prefix}: a stage name must be a folder name (no '/', not hidden, not "
                              f"'previous'), got {self.name!r}")
        for number, item in enumerate(self.set):
            if "=" not in item:
                raise ConfigError(f"{prefix}.set[{number}]: expected key=value, got {item!r}")
        if self.kind == "model":
            if not self.model:
                raise ConfigError(f"{prefix}.model: kind `model` needs the model directory to take")
            if self.launch:
                raise ConfigError(f"{prefix}.launch: kind `model` runs nothing, so it has no launch")
        elif not self.config:
            raise ConfigError(f"{prefix}.config: kind {self.kind!r} needs its experiment config file")
        from ms_nlp_compress.pipeline.stages import stage_kind

        allowed = stage_kind(self.kind, prefix).option_keys
        unknown = sorted(set(self.options) - set(allowed))
        if unknown:
            raise ConfigError(f"{prefix}.options: unknown key(s) {', '.join(unknown)} for kind {self.kind!r}; "
                              f"valid: {', '.join(allowed) or 'none'}")


@dataclass
class MeasureConfig:
    """How every produced model is measured for the report (the same splits, machine and shapes for all)."""

    batch_sizes: List[int] = field(default_factory=lambda: [1, 32])
    sequence_length: int = 128
    repeat: int = 5  # timed calls per shape after one warm-up call; the median is reported
    export: bool = True  # write and reload-check a MindIR of every model (its bytes go in the report)
    evaluate: bool = True  # dev and test metrics of every model on the first training stage's splits
    cpu_threads: Optional[int] = None  # None: the first stage config's runtime.cpu_threads

    def validate(self, prefix: str = "measure") -> None:
        if not self.batch_sizes or any(size < 1 for size in self.batch_sizes):
            raise ConfigError(f"{prefix}.batch_sizes: positive batch sizes required, got {self.batch_sizes}")
        if self.sequence_length < 2:
            raise ConfigError(f"{prefix}.sequence_length: at least 2, got {self.sequence_length}")
        if self.repeat < 1:
            raise ConfigError(f"{prefix}.repeat: at least 1, got {self.repeat}")


@dataclass
class PipelineConfig:
    name: str = "compress"
    run_dir: str = "runs/compress"
    stages: Dict[str, Any] = field(default_factory=dict)  # name -> StageSpec keys (typed in `specs`)
    measure: MeasureConfig = field(default_factory=MeasureConfig)
    launch: LaunchConfig = field(default_factory=LaunchConfig)  # every stage's; `stages.<name>.launch` overrides

    def stage_launch(self, stage: StageSpec) -> LaunchConfig:
        return self.launch.merged(stage.launch, f"stages.{stage.name}.launch")

    def specs(self) -> List[StageSpec]:
        """The stages in file order, type-checked (errors name `stages.<name>.<key>`)."""
        from ms_nlp_compress.config import from_mapping

        specs = []
        for name, values in self.stages.items():
            if not isinstance(values, dict):
                raise ConfigError(f"stages.{name}: expected a mapping of stage keys, got {values!r}")
            spec = from_mapping(StageSpec, values, f"stages.{name}")
            spec.name = str(name)
            specs.append(spec)
        return specs

    def validate(self, prefix: str = "") -> None:
        from ms_nlp_compress.pipeline.stages import stage_kind

        if not self.stages:
            raise ConfigError("stages: the pipeline has no stage")
        self.launch.validate("launch")
        for stage in self.specs():
            where = f"stages.{stage.name}"
            kind = stage_kind(stage.kind, where)  # unknown kinds are errors naming the key and the known kinds
            stage.validate(where)
            launch = self.stage_launch(stage)
            if kind.run is not None and (launch.workers or 1) > 1 and kind.run_parallel is None:
                key = f"{where}.launch.workers" if "workers" in stage.launch else "launch.workers"
                raise ConfigError(f"{key}: kind {stage.kind!r} has no data-parallel launch; run stage "
                                  f"{stage.name!r} with `launch: {{workers: 1}}`")
        enabled = [stage for stage in self.specs() if stage.enabled]
        if not enabled:
            raise ConfigError("stages: every stage is disabled")
        first = enabled[0]
        if stage_kind(first.kind).needs_input:
            raise ConfigError(f"stages: the first enabled stage {first.name!r} ({first.kind}) needs an input "
                              "model; start with a `finetune` or `model` stage")
        self.measure.validate("measure")


def stage_config_path(pipeline_file: Path, stage: StageSpec) -> Path:
    path = Path(stage.config)
    return path if path.is_absolute() else (pipeline_file.parent / path)
