"""The distillation loss cell shared by TinyBERT, DynaBERT and TernaryBERT.

    Distiller(teacher, student, mapping, projection, weights...)(input_ids, attention_mask, token_type_ids[, labels])
        -> (loss, (term_1, term_2, ...))      one graph: teacher forward, student forward, every enabled term

Teacher and student are any Cells mapping (input_ids, attention_mask, token_type_ids) to
(head output, hidden states, attention scores): `NezhaForSequenceClassification` built with output_hidden_states /
output_attentions, `student.BackboneOutputs` around a bare backbone (general distillation), a DynaBERT sub-network or
a fake-quantized TernaryBERT student. What differs between the algorithms is data, given to the constructor:
- the layer mapping (`mapping.LayerMapping`): TinyBERT's last-of-block, DynaBERT's floor(j / d) (`depth_mapping`),
  TernaryBERT's identity (`uniform_mapping(T, T)`);
- the projection (`HiddenProjection`): shared (TinyBERT's single fit_dense, present even at equal widths),
  per-layer, or none (same width, e.g. TernaryBERT or DynaBERT);
- the weight of each term, the temperature and whether the head is a regression.

The teacher is held in `Frozen` (eval mode whatever `set_train` says, no trainable Parameters) and its outputs pass
through `stop_gradient`, so only student and projection receive gradients. The components are the UNWEIGHTED terms,
in `component_names` order (only the enabled ones), so a log shows each term's own scale; `loss` is their weighted
sum.
"""
from __future__ import annotations

from typing import Optional, Tuple

import mindspore as ms
from mindspore import nn, ops
from mindspore.common.initializer import TruncatedNormal

from ms_nlp_compress.compress.distill.config import DistillConfig
from ms_nlp_compress.compress.distill.losses import (attention_mse, hidden_mse, logits_mse,
                                                     soft_cross_entropy)
from ms_nlp_compress.compress.distill.mapping import LayerMapping
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.frozen import Frozen
from ms_nlp_compress.train.losses import cross_entropy


class HiddenProjection(nn.Cell):
    """Student hidden states -> teacher width ("fit_dense"). One Dense shared by every matched state (the TinyBERT
    code: embeddings included), one per matched state (`per_layer`, the paper's separate W_e / W_h), or identity
    (`none`). Parameters are named `fit_dense.*` / `fit_denses.<k>.*`, never colliding with a student's names.
    """

    def __init__(self, kind: str, student_width: int, teacher_width: int, num_states: int,
                 initializer_range: float = 0.02):
        super().__init__()
        if kind not in ("shared", "per_layer", "none"):
            raise ConfigError(f"distill.projection: must be shared, per_layer or none, got {kind!r}")
        if kind == "none" and student_width != teacher_width:
            raise ConfigError(f"distill.projection: none needs equal widths, got student {student_width} and "
                              f"teacher {teacher_width}")
        self.kind = kind
        self.num_states = num_states

        def dense():
            return nn.Dense(student_width, teacher_width, weight_init=TruncatedNormal(initializer_range),
                            bias_init="zeros")

        if kind == "shared":
            self.fit_dense = dense()
        elif kind == "per_layer":
            self.fit_denses = nn.CellList([dense() for _ in range(num_states)])

    def construct(self, hidden, position: int):
        """Project the student state matched at `position` (0 = embeddings) of the mapping's hidden pairs."""
        if self.kind == "shared":
            return self.fit_dense(hidden)
        if self.kind == "per_layer":
            return self.fit_denses[position](hidden)
        return hidden


class Distiller(nn.Cell):
    """Loss cell: `(loss, components)` from one teacher and one student forward on the same batch.

    Args:
        teacher: a Cell, wrapped in `Frozen` here unless it already is one.
        student: the trainable Cell.
        mapping: which teacher state each student state is compared with.
        projection: a `HiddenProjection` (required when a hidden term is on; kind `none` for identity).
        embedding_weight, hidden_weight, attention_weight, prediction_weight, hard_label_weight: term weights;
            a 0 weight removes the term from the graph and from `component_names`.
        temperature: of the soft cross-entropy.
        regression: the head has one output: the prediction term is MSE to the teacher's output and the hard-label
            term MSE to the label.
    """

    def __init__(self, teacher: nn.Cell, student: nn.Cell, mapping: LayerMapping,
                 projection: Optional[HiddenProjection] = None, embedding_weight: float = 1.0,
                 hidden_weight: float = 1.0, attention_weight: float = 1.0, prediction_weight: float = 1.0,
                 hard_label_weight: float = 0.0, temperature: float = 1.0, regression: bool = False):
        super().__init__()
        self.teacher = teacher if isinstance(teacher, Frozen) else Frozen(teacher)
        self.student = student
        self.uses_hidden = embedding_weight > 0 or hidden_weight > 0
        if self.uses_hidden and projection is None:
            raise ConfigError("distill.projection: a hidden-state term is on but no projection was given "
                              "(use HiddenProjection('none', ...) for equal widths)")
        if projection is not None and projection.kind == "per_layer" and \
                projection.num_states != len(mapping.hidden_pairs()):
            raise ConfigError(f"distill.projection: per_layer projection has {projection.num_states} layers but the "
                              f"mapping matches {len(mapping.hidden_pairs())} hidden states")
        if not temperature > 0:
            raise ConfigError(f"distill.temperature: must be > 0, got {temperature}")
        self.projection = projection
        self.mapping = mapping
        self.hidden_pairs = mapping.hidden_pairs()
        self.attention_pairs = mapping.attention_pairs()
        weights = (("embedding", embedding_weight), ("hidden", hidden_weight), ("attention", attention_weight),
                   ("prediction", prediction_weight), ("hard_label", hard_label_weight))
        for name, weight in weights:
            if not weight >= 0:
                raise ConfigError(f"distill.{name}_weight: must be >= 0, got {weight}")
        self.component_names = tuple(name for name, weight in weights if weight > 0)
        if not self.component_names:
            raise ConfigError("distill: every loss weight is 0: nothing to distil")
        self.embedding_weight, self.hidden_weight, self.attention_weight, self.prediction_weight, \
            self.hard_label_weight = (float(weight) for _, weight in weights)
        self.use_embedding = self.embedding_weight > 0
        self.use_hidden = self.hidden_weight > 0
        self.use_attention = self.attention_weight > 0
        self.use_prediction = self.prediction_weight > 0
        self.use_hard_label = self.hard_label_weight > 0
        self.temperature = float(temperature)
        self.regression = bool(regression)

    def trainable_cells(self) -> Tuple[nn.Cell, ...]:
        """The cells whose Parameters are trained and checkpointed (never the teacher)."""
        return (self.student,) if self.projection is None else (self.student, self.projection)

    def _project(self, hidden, position: int):
        return self.projection(hidden, position)

    def construct(self, input_ids, attention_mask, token_type_ids, labels=None):
        teacher_logits, teacher_hidden, teacher_scores = self.teacher(input_ids, attention_mask, token_type_ids)
        teacher_logits = ops.stop_gradient(teacher_logits)
        student_logits, student_hidden, student_scores = self.student(input_ids, attention_mask, token_type_ids)
        total = ops.zeros((), ms.float32)
        components = ()
        if self.use_embedding:
            student_index, teacher_index = self.hidden_pairs[0]
            term = hidden_mse(self._project(student_hidden[student_index].astype(ms.float32), 0),
                              ops.stop_gradient(teacher_hidden[teacher_index]).astype(ms.float32))
            total = total + self.embedding_weight * term
            components = components + (term,)
        if self.use_hidden:
            term = ops.zeros((), ms.float32)
            for position in range(1, len(self.hidden_pairs)):
                student_index, teacher_index = self.hidden_pairs[position]
                term = term + hidden_mse(self._project(student_hidden[student_index].astype(ms.float32), position),
                                         ops.stop_gradient(teacher_hidden[teacher_index]).astype(ms.float32))
            total = total + self.hidden_weight * term
            components = components + (term,)
        if self.use_attention:
            term = ops.zeros((), ms.float32)
            for student_index, teacher_index in self.attention_pairs:
                term = term + attention_mse(student_scores[student_index].astype(ms.float32),
                                            ops.stop_gradient(teacher_scores[teacher_index]).astype(ms.float32))
            total = total + self.attention_weight * term
            components = components + (term,)
        if self.use_prediction:
            if self.regression:
                term = logits_mse(student_logits.astype(ms.float32), teacher_logits.astype(ms.float32))
            else:
                term = soft_cross_entropy(student_logits.astype(ms.float32), teacher_logits.astype(ms.float32),
                                          self.temperature)
            total = total + self.prediction_weight * term
            components = components + (term,)
        if self.use_hard_label:
            if self.regression:
                error = student_logits.astype(ms.float32).reshape(-1) - labels.astype(ms.float32)
                term = (error * error).mean()
            else:
                term = cross_entropy(student_logits, labels)
            total = total + self.hard_label_weight * term
            components = components + (term,)
        return total, components


def prepare(teacher: nn.Cell, student: nn.Cell, config: DistillConfig, teacher_config: NezhaConfig,
            student_config: NezhaConfig, regression: bool = False, mapping: Optional[LayerMapping] = None,
            projection: Optional[HiddenProjection] = None) -> Distiller:
    """The TinyBERT verb: check the config against both backbones, build the mapping (unless given) and the
    projection (unless given), and return the Distiller. DynaBERT / TernaryBERT pass their own mapping."""
    checked = config.check_models(teacher_config, student_config)
    mapping = mapping or checked
    if projection is None and config.uses_hidden():
        projection = HiddenProjection(config.projection, student_config.hidden_size, teacher_config.hidden_size,
                                      len(mapping.hidden_pairs()), student_config.initializer_range)
    return Distiller(teacher, student, mapping, projection, config.embedding_weight, config.hidden_weight,
                     config.attention_weight, config.prediction_weight, config.hard_label_weight,
                     config.temperature, regression)
