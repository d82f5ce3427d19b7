"""Teacher/student layer mappings as data.

Convention: layer NUMBER 0 is the embedding output and number i (1-based) is the output of Transformer layer i.
That number is also the index into the list of hidden states a model returns (embedding output first), so
`LayerMapping.teacher_layers[j]` is directly the teacher hidden-state index matched to student hidden state j.
Attention lists have no embedding entry: student layer i's scores (list index i-1) match teacher layer
teacher_layers[i] (list index teacher_layers[i]-1). `hidden_pairs()` / `attention_pairs()` give list indices.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple

from ms_nlp_compress.errors import ConfigError


def _check_layer_count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class LayerMapping:
    """teacher_layers[j] = teacher layer number matched to student layer number j; teacher_layers[0] == 0."""

    teacher_layers: Tuple[int, ...]
    num_teacher_layers: int

    def __post_init__(self):
        _check_layer_count("num_teacher_layers", self.num_teacher_layers)
        if len(self.teacher_layers) < 2 or self.teacher_layers[0] != 0:
            raise ConfigError("LayerMapping.teacher_layers must start with 0 (embeddings) and map at least one "
                              f"layer, got {self.teacher_layers!r}")

    @property
    def num_student_layers(self) -> int:
        return len(self.teacher_layers) - 1

    def hidden_pairs(self) -> Tuple[Tuple[int, int], ...]:
        """(student hidden-state index, teacher hidden-state index), embeddings included."""
        return tuple(enumerate(self.teacher_layers))

    def attention_pairs(self) -> Tuple[Tuple[int, int], ...]:
        """(student attention-list index, teacher attention-list index) for layers 1..S."""
        return tuple((student - 1, teacher - 1)
                     for student, teacher in enumerate(self.teacher_layers) if student > 0)


def uniform_mapping(num_student_layers: int, num_teacher_layers: int) -> LayerMapping:
    """TinyBERT's "last layer of each block": student layer i -> teacher layer i * T / S (T divisible by S).

    TinyBERT4 on a 12-layer teacher: 3, 6, 9, 12. The last layer of a block has seen the whole block, which is why
    the reference picks it rather than the first. Non-divisible depths need an explicit mapping.
    """
    _check_layer_count("num_student_layers", num_student_layers)
    _check_layer_count("num_teacher_layers", num_teacher_layers)
    if num_teacher_layers % num_student_layers:
        raise ConfigError(f"uniform mapping needs num_teacher_layers ({num_teacher_layers}) divisible by "
                          f"num_student_layers ({num_student_layers}); give an explicit mapping instead")
    block = num_teacher_layers // num_student_layers
    return LayerMapping(tuple(layer * block for layer in range(num_student_layers + 1)), num_teacher_layers)


def explicit_mapping(teacher_layers: Sequence[int], num_student_layers: int, num_teacher_layers: int) -> LayerMapping:
    """Mapping from config: teacher_layers[i-1] = teacher layer (1..T) for student layer i (1..S).

    The embedding pair 0 -> 0 is implicit. Repeats and non-monotonic orders are allowed; every index must be an
    integer in 1..T and the list must have exactly S entries.
    """
    _check_layer_count("num_student_layers", num_student_layers)
    _check_layer_count("num_teacher_layers", num_teacher_layers)
    layers = list(teacher_layers)
    if len(layers) != num_student_layers:
        raise ConfigError(f"layer mapping has {len(layers)} entries but the student has {num_student_layers} layers "
                          "(one teacher layer per student layer, embeddings implicit)")
    for position, layer in enumerate(layers, start=1):
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise ConfigError(f"layer mapping entry for student layer {position} must be an integer, got {layer!r}")
        if not 1 <= layer <= num_teacher_layers:
            raise ConfigError(f"layer mapping entry for student layer {position} is {layer}, outside the teacher's "
                              f"layers 1..{num_teacher_layers}")
    return LayerMapping((0, *layers), num_teacher_layers)


def depth_mapping(depth_multiplier: float, num_teacher_layers: int) -> LayerMapping:
    """DynaBERT's depth rule as a mapping: a sub-network of round(T * d) layers; student hidden state j is matched
    with teacher hidden state floor(j / d) (j = 0 is the embeddings, the last student state meets teacher layer T).

    d = 0.5 on 12 layers: 0, 2, 4, ..., 12; d = 0.75: 0, 1, 2, 4, 5, 6, 8, 9, 10, 12. The multiplier is read as
    the fraction depth / T (0.75 of 12 is exactly 9/12), so floating-point error never moves a floor.
    """
    from fractions import Fraction

    _check_layer_count("num_teacher_layers", num_teacher_layers)
    if isinstance(depth_multiplier, bool) or not isinstance(depth_multiplier, (int, float)) \
            or not 0 < depth_multiplier <= 1:
        raise ConfigError(f"depth multiplier must be in (0, 1], got {depth_multiplier!r}")
    depth = round(num_teacher_layers * depth_multiplier)
    if depth < 1:
        raise ConfigError(f"depth multiplier {depth_multiplier} keeps no layer of a {num_teacher_layers}-layer "
                          "teacher")
    ratio = Fraction(depth, num_teacher_layers)  # d as an exact fraction
    return LayerMapping(tuple(int(Fraction(j) / ratio) for j in range(depth + 1)), num_teacher_layers)
