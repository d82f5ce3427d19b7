"""The `dynabert:` config section.

Defaults are the reference's (algorithms.md Part B 3): widths 1.0/0.75/0.5/0.25, depths 1.0/0.75/0.5, stage 1
(DynaBERT_W, depth fixed at 1.0) with logits weight 1.0 and hidden weight 0.1, stage 2 (DynaBERT) with 1.0 / 1.0.
`from_dict` rejects unknown keys and wrong types; `validate` names the key of every impossible value.
"""
from __future__ import annotations

from dataclasses import dataclass, field
import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from ms_nlp_compress.config import TrainConfig, from_mapping, train_overrides
from ms_nlp_compress.errors import ConfigError

# DynaBERT_W (stage 1), DynaBERT (stage 2), the optional final fine-tuning (the reference's `final_finetuning`:
# every sub-network on the labels, no teacher)
STAGES = ("width", "width_depth", "final")
TEACHERS = ("same_width", "full_width")  # stage 2: the paper's teacher, or the reference code's
GRAPHS = ("separate", "single")  # one gradient graph per sub-network (summed), or one graph over all of them


@dataclass
class DynaBertConfig:
    """Sub-networks to train, loss weights per stage, the stage-2 teacher and the importance slice.

    Loss of one sub-network (Part B 3.4): logits_weight * SCE(z_S, z_T) + hidden_weight * sum_j MSE(h_S_j, h_T_g(j))
    over the embedding output and every kept layer (g(j) = floor(j / d)); no attention term. Every batch sums this
    over all (width, depth) sub-networks, then takes one clipped update.
    """

    width_multipliers: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5, 0.25])
    depth_multipliers: List[float] = field(default_factory=lambda: [1.0, 0.75, 0.5])
    stage: str = "width"  # width: DynaBERT_W (depth 1.0 only); width_depth: DynaBERT (every depth); final: labels
    teacher: str = "full_width"  # stage width_depth: same_width (paper) or full_width (reference code)
    stage1_logits_weight: float = 1.0
    stage1_hidden_weight: float = 0.1
    stage2_logits_weight: float = 1.0
    stage2_hidden_weight: float = 1.0
    importance_examples: int = 2048  # held-out TRAINING examples scored for importance (not dev: no leakage)
    importance_batch_size: int = 32
    # separate: one compiled gradient graph per sub-network, gradients summed, one clip and one update (the
    # engine's `separate_members` mode); single: one graph over the sum (exact too, but on CPU its compile memory
    # grows with the number of sub-networks: 5.2 GB for 1 and > 11.7 GB for 12 at MiniLM shape, README).
    graph: str = "separate"
    # `msnc dynabert train`: the fine-tuned teacher (a model directory; else `pretrained`), the stages run in order,
    # and `train:` keys overridden per stage (as distill.intermediate_train).
    teacher_model: Optional[str] = None
    stages: List[str] = field(default_factory=lambda: ["width", "width_depth"])
    width_train: Dict[str, Any] = field(default_factory=dict)
    width_depth_train: Dict[str, Any] = field(default_factory=dict)
    final_train: Dict[str, Any] = field(default_factory=dict)
    # TinyBERT's data augmentation (`msnc augment`'s TSV, originals included) replaces the training split in the
    # stages listed (the reference: both distillation stages with --data_aug; the final fine-tuning without).
    augmented_train: Optional[str] = None
    augmented_stages: List[str] = field(default_factory=lambda: ["width", "width_depth"])

    def validate(self, prefix: str = "dynabert") -> None:
        def check(condition: bool, key: str, message: str) -> None:
            if not condition:
                raise ConfigError(f"{prefix}.{key}: {message}")

        for key in ("width_multipliers", "depth_multipliers"):
            values = getattr(self, key)
            check(len(values) > 0, key, "must list at least one multiplier")
            for value in values:
                check(not isinstance(value, bool) and isinstance(value, (int, float)) and 0 < value <= 1, key,
                      f"every multiplier must be in (0, 1], got {value!r}")
            check(len(set(values)) == len(values), key, f"has repeated values: {values}")
        check(self.stage in STAGES, "stage", f"must be one of {STAGES}, got {self.stage!r}")
        check(self.teacher in TEACHERS, "teacher", f"must be one of {TEACHERS}, got {self.teacher!r}")
        for key in ("stage1_logits_weight", "stage1_hidden_weight", "stage2_logits_weight", "stage2_hidden_weight"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        for stage in ("stage1", "stage2"):
            check(getattr(self, f"{stage}_logits_weight") > 0 or getattr(self, f"{stage}_hidden_weight") > 0,
                  f"{stage}_logits_weight", "both weights of this stage are 0: nothing to distil")
        for key in ("importance_examples", "importance_batch_size"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.graph in GRAPHS, "graph", f"must be one of {GRAPHS}, got {self.graph!r}")
        check(len(self.stages) > 0, "stages", "must list at least one stage")
        for stage in self.stages:
            check(stage in STAGES, "stages", f"every stage must be one of {STAGES}, got {stage!r}")
        check(list(self.stages) == sorted(set(self.stages), key=STAGES.index), "stages",
              f"must be in order {list(STAGES)} without repeats, got {list(self.stages)}")
        for stage in self.augmented_stages:
            check(stage in STAGES, "augmented_stages", f"every stage must be one of {STAGES}, got {stage!r}")

    @classmethod
    def from_dict(cls, values: Dict[str, Any], source: str = "<dict>") -> "DynaBertConfig":
        config = from_mapping(cls, values, source, "dynabert")
        try:
            config.validate()
        except ConfigError as err:
            raise ConfigError(f"{source}: {err}") from None
        return config

    def stage_train(self, train: TrainConfig, stage: str, prefix: str = "dynabert") -> TrainConfig:
        """The `train:` section with `<stage>_train`'s keys overridden (typed and validated; errors name the key)."""
        return train_overrides(train, getattr(self, f"{stage}_train"), f"{prefix}.{stage}_train")

    def for_stage(self, stage: str) -> "DynaBertConfig":
        """This section with `stage` set (what `build_loss` reads)."""
        config = dataclasses.replace(self, stage=stage)
        config.validate()
        return config

    def widths(self) -> Tuple[float, ...]:
        """Widths in descending order (the reference's loop order)."""
        return tuple(sorted((float(w) for w in self.width_multipliers), reverse=True))

    def depths(self) -> Tuple[float, ...]:
        """Depths trained in this stage, descending: stage `width` trains full depth only."""
        if self.stage == "width":
            return (1.0,)
        return tuple(sorted((float(d) for d in self.depth_multipliers), reverse=True))

    def loss_weights(self) -> Tuple[float, float]:
        """(logits weight, hidden weight) of this stage (stage `final` has no teacher: (0, 0))."""
        if self.stage == "final":
            return 0.0, 0.0
        if self.stage == "width":
            return self.stage1_logits_weight, self.stage1_hidden_weight
        return self.stage2_logits_weight, self.stage2_hidden_weight
