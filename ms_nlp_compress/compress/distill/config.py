"""The `distill:` config section (TinyBERT; the same terms serve DynaBERT and TernaryBERT).

`DistillConfig.validate` checks the section on its own (types and ranges, like every section). Whether it fits the
two models it is used with (mapping in range, equal head counts under the attention term, same vocabulary, widths
without a projection) is only known once both model configs are known: `check_models(teacher, student)` does that
and every error names the key and BOTH sides.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from ms_nlp_compress.compress.distill.mapping import LayerMapping, explicit_mapping, uniform_mapping
from ms_nlp_compress.errors import ConfigError

STUDENT_INITS = ("scratch", "pretrained", "teacher_layers")
PROJECTIONS = ("shared", "per_layer", "none")
WEIGHT_KEYS = ("embedding_weight", "hidden_weight", "attention_weight", "prediction_weight", "hard_label_weight")
STAGES = ("intermediate", "prediction")  # TinyBERT task distillation: stage 1, stage 2


@dataclass
class DistillConfig:
    """Teacher, student, layer mapping, projection and the weight of each loss term.

    Loss = embedding_weight * MSE(P h_S_0, h_T_0) + hidden_weight * sum_j>=1 MSE(P h_S_j, h_T_g(j))
         + attention_weight * sum_i MSE(A_S_i, A_T_g(i)) + prediction_weight * SCE(z_S / t, z_T / t)
         + hard_label_weight * CE(z_S, y).
    A term with weight 0 is not computed. TinyBERT's stage 1 (and general distillation) is the first three terms,
    its stage 2 the prediction term alone: `intermediate_only()` / `prediction_only()` give those copies.
    """

    teacher: Optional[str] = None  # a model directory or HF folder (`cache:` prefix allowed); null: `pretrained`
    student: Optional[str] = "tinybert4"  # a preset of compress/distill/student.py; null: student_model
    student_model: Optional[NezhaConfig] = None  # any backbone config; overrides the preset when given
    student_init: str = "scratch"  # scratch | pretrained (a general-distilled student) | teacher_layers
    student_init_path: Optional[str] = None  # the general-distilled student's model directory (init pretrained)
    student_init_layers: Optional[List[int]] = None  # teacher layers (1..T) copied into student layers 1..S;
    # null: the layer mapping's layers (init teacher_layers)
    layer_mapping: Optional[List[int]] = None  # teacher layer (1..T) per student layer; null: uniform last-of-block
    projection: str = "shared"  # shared (one fit_dense, as the reference code) | per_layer | none (equal widths)
    embedding_weight: float = 1.0
    hidden_weight: float = 1.0
    attention_weight: float = 1.0
    prediction_weight: float = 1.0
    hard_label_weight: float = 0.0
    temperature: float = 1.0
    # The commands (compress/distill/run.py):
    corpus: Optional[str] = None  # `distill general`: one sentence per line (`cache:brown/corpus.txt`)
    stages: List[str] = field(default_factory=lambda: list(STAGES))  # `distill task`: the stages to run, in order
    augmented_train: Optional[str] = None  # `distill task`: `msnc augment`'s TSV (the task's train format);
    # null: data.data_dir/train.tsv (subsampled per data.train_limit)
    augmented_stages: List[str] = field(default_factory=lambda: list(STAGES))  # stages that read augmented_train
    # (the reference code trains both on the augmented set)
    intermediate_train: Dict[str, Any] = field(default_factory=dict)  # `train:` keys overridden for stage 1
    prediction_train: Dict[str, Any] = field(default_factory=dict)  # `train:` keys overridden for stage 2

    def validate(self, prefix: str = "distill") -> None:
        def check(condition: bool, key: str, message: str) -> None:
            if not condition:
                raise ConfigError(f"{prefix}.{key}: {message}")

        check(self.student_init in STUDENT_INITS, "student_init",
              f"must be one of {STUDENT_INITS}, got {self.student_init!r}")
        check(self.projection in PROJECTIONS, "projection", f"must be one of {PROJECTIONS}, got {self.projection!r}")
        for key in WEIGHT_KEYS:
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        check(any(getattr(self, key) > 0 for key in WEIGHT_KEYS), "prediction_weight",
              "every loss weight is 0: nothing to distil")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(self.student is not None or self.student_model is not None or self.student_init == "pretrained",
              "student", "no student: name a preset, give student_model, or use student_init: pretrained")
        if self.student is not None and self.student_model is None:
            from ms_nlp_compress.compress.distill.student import PRESETS

            check(self.student in PRESETS, "student", f"unknown preset {self.student!r}; one of {sorted(PRESETS)}")
        if self.student_model is not None:
            self.student_model.validate(f"{prefix}.student_model")
        check((self.student_init == "pretrained") == (self.student_init_path is not None), "student_init_path",
              f"is required with student_init: pretrained and only then (student_init is {self.student_init!r}, "
              f"student_init_path is {self.student_init_path!r})")
        if self.student_init_layers is not None:
            check(self.student_init == "teacher_layers", "student_init_layers",
                  f"only used with student_init: teacher_layers, but student_init is {self.student_init!r}")
        for key in ("layer_mapping", "student_init_layers"):
            values = getattr(self, key)
            if values is not None:
                check(len(values) > 0, key, "must list one teacher layer per student layer")
                check(all(value >= 1 for value in values), key,
                      f"teacher layers are numbered 1..T (0 is the embedding output, always matched), got {values}")
        for key in ("stages", "augmented_stages"):
            values = getattr(self, key)
            check(all(value in STAGES for value in values), key, f"entries must be among {STAGES}, got {values}")
            check(len(set(values)) == len(values), key, f"an entry is repeated: {values}")
        check(len(self.stages) > 0, "stages", f"nothing to run: list one or both of {STAGES}")
        check(list(self.stages) == [stage for stage in STAGES if stage in self.stages], "stages",
              f"stage 1 (intermediate) runs before stage 2 (prediction), got {self.stages}")
        for stage in STAGES:
            self.stage_train(TrainConfig(), stage, prefix)  # unknown keys, wrong types, bad values

    def stage_train(self, train: TrainConfig, stage: str, prefix: str = "distill") -> TrainConfig:
        """The `train:` section with `<stage>_train`'s keys overridden (typed and validated; errors name the key)."""
        return train_overrides(train, getattr(self, f"{stage}_train"), f"{prefix}.{stage}_train")

    # ------------------------------------------------------------------------------------------------------------
    def uses_hidden(self) -> bool:
        return self.embedding_weight > 0 or self.hidden_weight > 0

    def intermediate_only(self) -> "DistillConfig":
        """TinyBERT stage 1 / general distillation: hidden, embedding and attention terms, no prediction terms."""
        return dataclasses.replace(self, prediction_weight=0.0, hard_label_weight=0.0)

    def prediction_only(self) -> "DistillConfig":
        """TinyBERT stage 2: the prediction term (and the hard-label term if configured), nothing intermediate."""
        return dataclasses.replace(self, embedding_weight=0.0, hidden_weight=0.0, attention_weight=0.0)

    def mapping(self, num_student_layers: int, num_teacher_layers: int, prefix: str = "distill") -> LayerMapping:
        """The configured layer mapping; its errors name `<prefix>.layer_mapping` and both layer counts."""
        try:
            if self.layer_mapping is None:
                return uniform_mapping(num_student_layers, num_teacher_layers)
            return explicit_mapping(self.layer_mapping, num_student_layers, num_teacher_layers)
        except ConfigError as err:
            raise ConfigError(f"{prefix}.layer_mapping: {err} (student {num_student_layers} layers, teacher "
                              f"{num_teacher_layers} layers)") from None

    def check_models(self, teacher: NezhaConfig, student: NezhaConfig, prefix: str = "distill",
                     teacher_name: str = "teacher", student_name: str = "student") -> LayerMapping:
        """Check the section against the two backbones; returns the layer mapping. Errors name both sides."""
        sides = f"{teacher_name} vs {student_name}"
        for key in ("vocab_size", "type_vocab_size"):
            if getattr(teacher, key) != getattr(student, key):
                raise ConfigError(f"{prefix}.student: {teacher_name} {key} is {getattr(teacher, key)} but "
                                  f"{student_name} {key} is {getattr(student, key)}: teacher and student must "
                                  "share one vocabulary (the same input ids feed both)")
        mapping = self.mapping(student.num_layers, teacher.num_layers, prefix)
        if self.attention_weight > 0:
            for student_index, teacher_index in mapping.attention_pairs():
                student_heads = student.heads_of_layer(student_index)
                teacher_heads = teacher.heads_of_layer(teacher_index)
                if student_heads != teacher_heads:
                    raise ConfigError(
                        f"{prefix}.attention_weight: student layer {student_index + 1} has {student_heads} heads but "
                        f"the teacher layer it maps to ({teacher_index + 1}) has {teacher_heads} ({sides}); attention "
                        "scores are compared head by head: use equal head counts or set attention_weight: 0")
        if self.uses_hidden() and self.projection == "none" and teacher.hidden_size != student.hidden_size:
            raise ConfigError(f"{prefix}.projection: none needs equal widths, but {teacher_name} hidden_size is "
                              f"{teacher.hidden_size} and {student_name} hidden_size is {student.hidden_size}")
        if self.student_init == "teacher_layers":
            layers = self.init_layers(mapping)
            if len(layers) != student.num_layers:
                raise ConfigError(f"{prefix}.student_init_layers: {len(layers)} entries for a {student.num_layers}-"
                                  f"layer student ({sides})")
            for position, layer in enumerate(layers, start=1):
                if not 1 <= layer <= teacher.num_layers:
                    raise ConfigError(f"{prefix}.student_init_layers: entry for student layer {position} is {layer}, "
                                      f"outside the teacher's layers 1..{teacher.num_layers}")
        return mapping

    def init_layers(self, mapping: LayerMapping) -> Tuple[int, ...]:
        """Teacher layers (1..T) copied into student layers 1..S for student_init: teacher_layers."""
        if self.student_init_layers is not None:
            return tuple(self.student_init_layers)
        return tuple(mapping.teacher_layers[1:])


@dataclass
class AugmentConfig:
    """TinyBERT data augmentation (data/augment.py). Defaults are the reference's M = 15, p = 0.4; N per task in the
    reference: CoLA/MRPC/RTE/STS-B 30, SST-2/QNLI 20, MNLI/QQP 10."""

    candidates: int = 15  # K: candidates per word (MLM top-K before dropping "##" pieces, or K nearest vectors)
    replace_prob: float = 0.4  # p: each word with candidates is replaced with this probability in each sample
    samples: int = 20  # N: sampling rounds per sentence (duplicates dropped, so <= N variants + the original)
    seed: int = 42
    batch_size: int = 64  # masked sentences per MLM forward / queries per neighbour search
    max_length: int = 128  # tokens of the MLM input "[CLS] masked [SEP] original [SEP]"
    max_vectors: int = 100000  # words read from a GloVe-format file (the reference's 100,000)

    def validate(self, prefix: str = "augment") -> None:
        def check(condition: bool, key: str, message: str) -> None:
            if not condition:
                raise ConfigError(f"{prefix}.{key}: {message}")

        for key in ("candidates", "samples", "batch_size", "max_vectors"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(0.0 <= self.replace_prob <= 1.0, "replace_prob", f"must be in [0, 1], got {self.replace_prob}")
        check(self.max_length >= 5, "max_length", f"must be >= 5 (room for specials and a word), got "
                                                  f"{self.max_length}")


# ms_nlp_compress.config binds this module's classes at its own end, so this import comes last: whichever of the two
# modules is imported first, the other then finds every name it needs already defined.
from ms_nlp_compress.config import NezhaConfig, TrainConfig, train_overrides  # noqa: E402
