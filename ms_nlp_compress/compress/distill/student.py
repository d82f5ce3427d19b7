"""Student construction: a named preset or any NezhaConfig, initialised from scratch, from a general-distilled
student, or from chosen teacher layers.

Presets fix only the shape (layers, width, FFN, heads); everything else (vocabulary, position embedding kind and
range, activation, LayerNorm epsilon, kernels) is copied from the teacher, since teacher and student read the same
input ids.

Slicing rule for students narrower than the teacher (`student_init: teacher_layers`): LEADING slices, head by head.
- hidden axes keep the first H_S of the teacher's H_T features (embeddings, LayerNorms, every dense input/output);
- attention keeps the first N_S heads and, inside each kept head, the first D_S of its D_T dimensions (Q/K/V rows,
  attention-output columns), so student head h starts from teacher head h: the attention loss compares scores head
  by head, and a head assembled from pieces of several teacher heads would start far from every one of them;
- FFN keeps the first I_S neurons (intermediate rows, output columns).
Why leading: it is the same rule as DynaBERT's width slicing, so a teacher rewired by importance first
(compress/dynabert/rewire.py) gives an importance-ordered slice with no extra code; without rewiring, hidden
features have no natural order and any fixed slice is as good as another. The sliced student is not the teacher's
function (LayerNorm statistics and the 1/sqrt(D) scale change); it is a starting point, as in the reference.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np

from mindspore import nn

from ms_nlp_compress.compress.distill.config import DistillConfig
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import CheckpointError, ConfigError

# Shapes of the TinyBERT students (algorithms.md Part B 2.7); 12 heads as the 12-head teachers they were built for.
PRESETS: Dict[str, Dict[str, int]] = {
    "tinybert4": {"num_layers": 4, "hidden_size": 312, "intermediate_size": 1200, "num_heads": 12},
    "tinybert6": {"num_layers": 6, "hidden_size": 768, "intermediate_size": 3072, "num_heads": 12},
}
SHAPE_KEYS = ("num_layers", "hidden_size", "intermediate_size", "num_heads", "head_dim", "layer_num_heads",
              "layer_intermediate_sizes")


def preset_config(name: str, teacher: NezhaConfig) -> NezhaConfig:
    """The preset's shape on top of the teacher's vocabulary and backbone settings."""
    if name not in PRESETS:
        raise ConfigError(f"distill.student: unknown preset {name!r}; one of {sorted(PRESETS)}")
    config = dataclasses.replace(teacher, head_dim=None, layer_num_heads=None, layer_intermediate_sizes=None,
                                 **PRESETS[name])
    config.validate(f"distill.student ({name})")
    return config


def _same_shape(first: NezhaConfig, second: NezhaConfig) -> bool:
    return all(getattr(first, key) == getattr(second, key) for key in SHAPE_KEYS) and \
        first.attention_head_size == second.attention_head_size


def resolve_student_config(distill: DistillConfig, teacher: NezhaConfig,
                           pretrained_student: Optional[NezhaConfig] = None) -> NezhaConfig:
    """The student's NezhaConfig: `student_model`, else the preset on the teacher's settings; with
    `student_init: pretrained` the saved student's config, which must agree with the preset / student_model."""
    if distill.student_model is not None:
        requested = dataclasses.replace(distill.student_model)
    elif distill.student is not None:
        requested = preset_config(distill.student, teacher)
    else:
        requested = None
    if pretrained_student is None:
        if requested is None:
            raise ConfigError("distill.student: no student shape (a preset or student_model) and no pretrained "
                              "student")
        return requested
    if requested is not None and not _same_shape(requested, pretrained_student):
        shown = {key: getattr(pretrained_student, key) for key in SHAPE_KEYS if getattr(pretrained_student, key)}
        asked = {key: getattr(requested, key) for key in SHAPE_KEYS if getattr(requested, key)}
        raise ConfigError(f"distill.student: the pretrained student ({distill.student_init_path}) has shape {shown} "
                          f"but the config asks for {asked}; set distill.student: null to take the saved shape")
    return dataclasses.replace(pretrained_student, dropout_impl=teacher.dropout_impl, kernels=teacher.kernels)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation from teacher layers
# ----------------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"^(.*encoder\.layers\.)(\d+)(\..*)$")


def _head_index(heads: int, student_dim: int, teacher_dim: int) -> np.ndarray:
    """Rows of the teacher's (N_T * D_T) attention axis kept for N_S heads of D_S: head h -> first D_S of head h."""
    return np.concatenate([head * teacher_dim + np.arange(student_dim) for head in range(heads)])


def _slice_axes(name: str, value: np.ndarray, target_shape: Tuple[int, ...], head_rows: Optional[np.ndarray]):
    """Leading slice on every axis, except attention axes, which are sliced head by head (`head_rows`)."""
    attention_in = re.search(r"self_attention\.(query|key|value)\.(weight|bias)$", name)
    attention_out = re.search(r"attention\.output\.dense\.weight$", name)
    result = value
    for axis, size in enumerate(target_shape):
        if size > result.shape[axis]:
            raise ConfigError(f"student tensor {name} axis {axis} has {size} entries but the teacher's has only "
                              f"{result.shape[axis]}: a student initialised from teacher layers cannot be wider")
        if head_rows is not None and ((attention_in and axis == 0) or (attention_out and axis == 1)):
            index = head_rows
        else:
            index = np.arange(size)
        result = np.take(result, index, axis=axis)
    return np.ascontiguousarray(result)


def weights_from_teacher_layers(teacher_weights: Dict[str, np.ndarray], teacher: NezhaConfig, student_cell: nn.Cell,
                                student: NezhaConfig, layers: Sequence[int]) -> Dict[str, np.ndarray]:
    """Student weights (named like `student_cell`'s Parameters) sliced from the teacher's: embeddings, pooler and
    any matching head from the teacher, student layer i (1-based) from teacher layer layers[i-1] (1-based).

    `teacher_weights` may be named with or without the `bert.` prefix; the student's names decide the output.
    """
    if len(layers) != student.num_layers:
        raise ConfigError(f"distill.student_init_layers: {len(layers)} entries for a {student.num_layers}-layer "
                          "student")
    stripped = {(key[len("bert."):] if key.startswith("bert.") else key): value
                for key, value in teacher_weights.items()}
    out: Dict[str, np.ndarray] = {}
    for name, param in student_cell.parameters_and_names():
        if name.endswith("rng_counter"):
            continue  # run state, not a weight
        base = name[len("bert."):] if name.startswith("bert.") else name
        head_rows = None
        match = _LAYER.match(base)
        if match:
            student_layer = int(match.group(2))
            teacher_layer = int(layers[student_layer]) - 1
            if not 0 <= teacher_layer < teacher.num_layers:
                raise ConfigError(f"distill.student_init_layers: entry for student layer {student_layer + 1} is "
                                  f"{teacher_layer + 1}, outside the teacher's layers 1..{teacher.num_layers}")
            base = f"{match.group(1)}{teacher_layer}{match.group(3)}"
            student_heads = student.heads_of_layer(student_layer)
            if student_heads > teacher.heads_of_layer(teacher_layer):
                raise ConfigError(f"student layer {student_layer + 1} has {student_heads} heads, more than teacher "
                                  f"layer {teacher_layer + 1} ({teacher.heads_of_layer(teacher_layer)})")
            if student.attention_head_size > teacher.attention_head_size:
                raise ConfigError(f"student head_dim {student.attention_head_size} exceeds the teacher's "
                                  f"{teacher.attention_head_size}")
            head_rows = _head_index(student_heads, student.attention_head_size, teacher.attention_head_size)
        if base not in stripped:
            raise CheckpointError(f"teacher has no tensor {base} to initialise student tensor {name}")
        out[name] = _slice_axes(name, stripped[base], tuple(param.shape), head_rows)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Building the student
# ----------------------------------------------------------------------------------------------------------------


def build_student(distill: DistillConfig, teacher_config: NezhaConfig, num_labels: Optional[int] = None,
                  teacher_weights: Optional[Dict[str, np.ndarray]] = None, resolve=Path) -> Tuple[nn.Cell, NezhaConfig]:
    """The student Cell (a classifier with `num_labels`, else a bare backbone behind `BackboneOutputs`) returning
    (logits or sequence output, hidden states, attention scores), and its config, initialised per `student_init`.

    `teacher_weights` (named numpy arrays) are needed for `student_init: teacher_layers`; `resolve` maps a config
    path string to a Path (the commands pass one that understands `cache:`).
    """
    from ms_nlp_compress.models.checkpoint import load_pretrained, load_weights, pretrained_config, saved_architecture

    pretrained = resolve(distill.student_init_path) if distill.student_init == "pretrained" else None
    saved = pretrained_config(pretrained) if pretrained is not None else None
    config = resolve_student_config(distill, teacher_config, saved)
    mapping = distill.check_models(teacher_config, config)
    hidden, attentions = distill.uses_hidden(), distill.attention_weight > 0
    cell = make_student_cell(config, num_labels, hidden, attentions)
    backbone = cell.bert if num_labels is not None else cell.backbone
    if distill.student_init == "pretrained":
        if num_labels is not None and saved_architecture(pretrained) == type(cell).__name__:
            load_pretrained(cell, pretrained)  # a stage-1 student: its head too
        else:  # a general-distilled backbone: the task head (and a pooler it never had) start fresh
            try:  # strict: missing, mis-shaped, wrongly typed or refused tensors are errors (a pooler starts fresh)
                load_pretrained(backbone, pretrained)
            except CheckpointError as err:
                raise CheckpointError(f"distill.student_init_path: {pretrained} does not fit the student:\n{err}") \
                    from None
    elif distill.student_init == "teacher_layers":
        if teacher_weights is None:
            raise ConfigError("distill.student_init: teacher_layers needs the teacher's weights")
        layers = distill.init_layers(mapping)
        # The teacher's task head is copied too when it has the same labels (its input axis sliced like the rest).
        with_head = num_labels is not None and "classifier.weight" in teacher_weights and \
            teacher_weights["classifier.weight"].shape[0] == num_labels
        target = cell if with_head else backbone
        sliced = weights_from_teacher_layers(teacher_weights, teacher_config, target, config, layers)
        load_weights(target, sliced, source="teacher layers " + ",".join(str(layer) for layer in layers))
    return cell, config


class BackboneOutputs(nn.Cell):
    """A bare backbone in the distiller's (head output, hidden states, scores) shape: general distillation has no
    task head, so the sequence output stands in for logits (the prediction terms are off there)."""

    def __init__(self, backbone: nn.Cell):
        super().__init__(auto_prefix=False)
        self.backbone = backbone

    def construct(self, input_ids, attention_mask=None, token_type_ids=None):
        sequence_output, _, all_hidden, all_scores = self.backbone(input_ids, attention_mask, token_type_ids)
        return sequence_output, all_hidden, all_scores


def make_student_cell(config: NezhaConfig, num_labels: Optional[int], output_hidden_states: bool,
                      output_attentions: bool) -> nn.Cell:
    from ms_nlp_compress.models.nezha import NezhaForSequenceClassification, NezhaModel

    if num_labels is not None:
        return NezhaForSequenceClassification(config, num_labels, output_hidden_states=output_hidden_states,
                                              output_attentions=output_attentions)
    return BackboneOutputs(NezhaModel(config, add_pooler=False, output_hidden_states=output_hidden_states,
                                      output_attentions=output_attentions))
