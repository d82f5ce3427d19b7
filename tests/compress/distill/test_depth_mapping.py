"""DynaBERT's depth mapping (student hidden j <- teacher hidden floor(j / d)) against the reference's float rule."""
import math

import pytest

from ms_nlp_compress.compress.distill.mapping import depth_mapping
from ms_nlp_compress.errors import ConfigError


def twin_dynabert(depth_multiplier, teacher_layers):
    """DynaBERT run_glue.py: depth = round(T * d) layers; hidden j compared with teacher hidden floor(j / d)."""
    depth = round(teacher_layers * depth_multiplier)
    return [math.floor(j / depth_multiplier) for j in range(depth + 1)]


@pytest.mark.parametrize("multiplier", [0.25, 0.5, 0.75, 1.0])
def test_depth_mapping_matches_reference_on_twelve_layers(multiplier):
    mapping = depth_mapping(multiplier, 12)
    assert list(mapping.teacher_layers) == twin_dynabert(multiplier, 12)
    assert mapping.teacher_layers[-1] == 12 and mapping.num_student_layers == round(12 * multiplier)


def test_depth_mapping_examples_and_exact_fraction():
    assert depth_mapping(0.75, 12).teacher_layers == (0, 1, 2, 4, 5, 6, 8, 9, 10, 12)
    assert depth_mapping(0.5, 12).attention_pairs() == ((0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11))
    # 0.25 of 6 rounds to 2 layers: the float rule floor(j / 0.25) would ask for teacher layer 8 of 6; the exact
    # fraction 2/6 keeps the last student state on the last teacher layer.
    assert depth_mapping(0.25, 6).teacher_layers == (0, 3, 6)


@pytest.mark.parametrize("multiplier,message", [(0.0, r"in \(0, 1\]"), (1.5, r"in \(0, 1\]"), (True, "must be"),
                                                (0.01, "keeps no layer")])
def test_depth_mapping_errors(multiplier, message):
    with pytest.raises(ConfigError, match=message):
        depth_mapping(multiplier, 12)
