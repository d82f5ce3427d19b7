"""Layer mappings: uniform last-of-block and explicit, validated against layer counts."""
import pytest

from ms_nlp_compress.compress.distill.mapping import LayerMapping, explicit_mapping, uniform_mapping
from ms_nlp_compress.errors import ConfigError


def twin_uniform(student_layers, teacher_layers):
    """TinyBERT code: student layer m (0-based) <- teacher index m*k + k - 1, hidden j <- j*k."""
    block = teacher_layers // student_layers
    return [0] + [index * block + block - 1 + 1 for index in range(student_layers)]


@pytest.mark.parametrize("student,teacher", [(4, 12), (6, 12), (12, 12), (1, 1), (1, 24), (3, 6)])
def test_uniform_mapping_matches_twin(student, teacher):
    mapping = uniform_mapping(student, teacher)
    assert list(mapping.teacher_layers) == twin_uniform(student, teacher)
    assert mapping.num_student_layers == student and mapping.num_teacher_layers == teacher


def test_tinybert4_pairs():
    mapping = uniform_mapping(4, 12)
    assert mapping.teacher_layers == (0, 3, 6, 9, 12)
    assert mapping.hidden_pairs() == ((0, 0), (1, 3), (2, 6), (3, 9), (4, 12))
    assert mapping.attention_pairs() == ((0, 2), (1, 5), (2, 8), (3, 11))


@pytest.mark.parametrize("student,teacher,message", [(5, 12, "divisible"), (0, 12, "num_student_layers"),
                                                     (4, -1, "num_teacher_layers"), (True, 12, "num_student"),
                                                     (13, 12, "divisible")])
def test_uniform_mapping_errors(student, teacher, message):
    with pytest.raises(ConfigError, match=message):
        uniform_mapping(student, teacher)


def test_explicit_mapping_allows_repeats_and_any_order():
    mapping = explicit_mapping([2, 2, 1], num_student_layers=3, num_teacher_layers=4)
    assert mapping.teacher_layers == (0, 2, 2, 1)
    assert mapping.attention_pairs() == ((0, 1), (1, 1), (2, 0))
    assert explicit_mapping((5,), 1, 5).hidden_pairs() == ((0, 0), (1, 5))


@pytest.mark.parametrize("layers,message", [([1, 2], "has 2 entries but the student has 3"),
                                            ([1, 2, 5], "student layer 3 is 5, outside the teacher's layers 1..4"),
                                            ([0, 1, 2], "student layer 1 is 0"),
                                            ([1, 2.0, 3], "student layer 2 must be an integer"),
                                            ([1, True, 3], "must be an integer")])
def test_explicit_mapping_errors(layers, message):
    with pytest.raises(ConfigError, match=message):
        explicit_mapping(layers, num_student_layers=3, num_teacher_layers=4)


def test_layer_mapping_requires_embedding_first():
    with pytest.raises(ConfigError, match="must start with 0"):
        LayerMapping((1, 2), 4)
    with pytest.raises(ConfigError, match="must start with 0"):
        LayerMapping((0,), 4)
