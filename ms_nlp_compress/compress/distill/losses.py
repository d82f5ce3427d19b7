"""Distillation losses (TinyBERT, TernaryBERT, DynaBERT) as pure functions on MindSpore tensors.

They run in PyNative, inside GRAPH_MODE `construct` and under `@ms.jit`. Finite input is assumed (graphs cannot
raise on data); check host-side with `ms_nlp_compress.compress.quant.primitives.validate_finite` where data enters.
Shape mismatches are static in graph mode, so they raise ValueError at compile time, naming the arguments.
"""
from __future__ import annotations

from mindspore import ops

# TinyBERT distils pre-softmax scores that already contain the additive padding mask (-10000). Entries at or
# below -100 are masked key columns: their exact value carries no information (softmax sends them to 0) and would
# dominate the MSE, so they are zeroed in BOTH student and teacher. Real scores never get near -100.
MASKED_SCORE_THRESHOLD = -100.0


def _check_same_shape(student, teacher, student_name: str, teacher_name: str) -> None:
    if tuple(student.shape) != tuple(teacher.shape):
        raise ValueError(f"{student_name} has shape {tuple(student.shape)} but {teacher_name} has shape "
                         f"{tuple(teacher.shape)}; they must match")


def soft_cross_entropy(student_logits, teacher_logits, temperature: float = 1.0):
    """-sum_c softmax(teacher / T)_c * log_softmax(student / T)_c, averaged over the batch. Shapes (B, C).

    Project decision (algorithms.md Part A): summed over classes (the textbook form), unlike the TinyBERT code which
    also averages over classes (a 1/C rescaling). No T^2 factor and no hard-label term, as in the references.
    """
    if not temperature > 0:
        raise ValueError(f"soft_cross_entropy: temperature must be > 0, got {temperature!r}")
    _check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    teacher_probabilities = ops.softmax(teacher_logits / float(temperature), -1)
    student_log_probabilities = ops.log_softmax(student_logits / float(temperature), -1)
    return -(teacher_probabilities * student_log_probabilities).sum(axis=-1).mean()


def logits_mse(student_logits, teacher_logits):
    """Regression distillation: MSE between student and TEACHER outputs (the reference regressed to the labels,
    a confirmed bug, issue #128). Mean over all elements."""
    _check_same_shape(student_logits, teacher_logits, "student_logits", "teacher_logits")
    difference = student_logits - teacher_logits
    return (difference * difference).mean()


def hidden_mse(student_hidden, teacher_hidden, projection=None):
    """MSE between projection(student_hidden) and teacher_hidden, averaged over all elements (padding included,
    as in TinyBERT). `projection` is any callable, typically a shared nn.Dense(student_width, teacher_width)
    ("fit_dense"); None when widths already match. Shapes (B, L, H_student) and (B, L, H_teacher)."""
    projected = student_hidden if projection is None else projection(student_hidden)
    _check_same_shape(projected, teacher_hidden, "projected student_hidden", "teacher_hidden")
    difference = projected - teacher_hidden
    return (difference * difference).mean()


def attention_mse(student_scores, teacher_scores, masked_threshold: float = MASKED_SCORE_THRESHOLD):
    """MSE of pre-softmax, scaled, masked attention scores (B, heads, L, L) after zeroing entries <= threshold in
    both tensors. Student and teacher need the same head count (TinyBERT's assumption)."""
    _check_same_shape(student_scores, teacher_scores, "student_scores", "teacher_scores")
    threshold = float(masked_threshold)
    student_kept = ops.where(student_scores <= threshold, ops.zeros_like(student_scores), student_scores)
    teacher_kept = ops.where(teacher_scores <= threshold, ops.zeros_like(teacher_scores), teacher_scores)
    difference = student_kept - teacher_kept
    return (difference * difference).mean()
