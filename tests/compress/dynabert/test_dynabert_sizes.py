"""Width/depth arithmetic against the reference's formulas (written out here with floats, as the PyTorch code
does) and the documented examples; DynaBertConfig validation names the key."""
import math

import pytest

from ms_nlp_compress.compress.distill.mapping import depth_mapping
from ms_nlp_compress.compress.dynabert.config import DynaBertConfig
from ms_nlp_compress.compress.dynabert.sizes import (depth_layer_mapping, heads_kept, intermediate_kept,
                                                     kept_layers, subnetwork_config, subnetwork_shape)
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError


def reference_round_to_nearest(input_size, width_mult, num_heads, min_value=1):
    """DynaBERT/transformers/modeling_bert.py, verbatim logic."""
    new_width_mult = round(num_heads * width_mult) * 1.0 / num_heads
    return max(min_value, int(new_width_mult * input_size))


def reference_kept_layers(num_layers, depth_mult):
    """The reference BertEncoder: depth = round(L * d); kept = floor(i / d)."""
    return tuple(int(math.floor(i / depth_mult)) for i in range(round(num_layers * depth_mult)))


def test_bert_base_widths_are_the_documented_ones():
    assert [heads_kept(12, w) for w in (1.0, 0.75, 0.5, 0.25)] == [12, 9, 6, 3]
    assert [intermediate_kept(3072, 12, w) for w in (1.0, 0.75, 0.5, 0.25)] == [3072, 2304, 1536, 768]


@pytest.mark.parametrize("num_heads,intermediate", [(12, 3072), (12, 1536), (16, 4096), (4, 37), (6, 10), (1, 3)])
def test_widths_equal_the_reference_round_to_nearest(num_heads, intermediate):
    for step in range(1, 101):
        width = step / 100
        if round(num_heads * width) == 0:
            with pytest.raises(ConfigError, match=f"width multiplier {width} keeps"):
                heads_kept(num_heads, width)
            continue
        assert heads_kept(num_heads, width) == reference_round_to_nearest(num_heads, width, num_heads)
        assert intermediate_kept(intermediate, num_heads, width) == \
            reference_round_to_nearest(intermediate, width, num_heads)


def test_width_rounds_half_to_even_like_the_reference():
    assert heads_kept(12, 0.125) == 2 == round(1.5)  # not 2 by accident: 12 * 0.2083 = 2.5 -> 2 as well
    assert heads_kept(4, 0.625) == 2  # round(2.5) = 2 (ties to even)
    assert heads_kept(4, 0.875) == 4  # round(3.5) = 4


def test_depth_rule_examples_and_reference_formula():
    assert kept_layers(12, 0.5) == (0, 2, 4, 6, 8, 10)
    assert kept_layers(12, 0.75) == (0, 1, 2, 4, 5, 6, 8, 9, 10)
    assert kept_layers(12, 1.0) == tuple(range(12))
    assert kept_layers(6, 0.5) == (0, 2, 4)
    for layers in range(1, 25):
        for step in range(1, 21):
            depth = step / 20
            if round(layers * depth) == 0:
                continue
            assert kept_layers(layers, depth) == reference_kept_layers(layers, depth), (layers, depth)
            mapping = depth_layer_mapping(layers, depth).teacher_layers
            expected = tuple(min(math.floor(j / depth), layers) for j in range(round(layers * depth) + 1))
            assert mapping == expected, (layers, depth)
            if (layers * depth).is_integer():  # then the distill package's fraction rule agrees
                assert mapping == depth_mapping(depth, layers).teacher_layers, (layers, depth)


def test_depth_on_six_layers_follows_the_reference_not_the_fraction_rule():
    assert kept_layers(6, 0.75) == (0, 1, 2, 4)  # round(4.5) = 4 layers, floor(i / 0.75)
    assert depth_layer_mapping(6, 0.75).teacher_layers == (0, 1, 2, 4, 5)
    assert depth_mapping(0.75, 6).teacher_layers == (0, 1, 3, 4, 6)  # the distill package's rule differs here
    assert depth_layer_mapping(3, 0.5).teacher_layers == (0, 2, 3)  # floor(2 / 0.5) = 4 capped at 3


@pytest.mark.parametrize("bad", [0, 0.0, -0.5, 1.5, float("nan"), True, "0.5"])
def test_impossible_multipliers_are_errors_naming_the_value(bad):
    with pytest.raises(ConfigError, match=r"width multiplier must be a number in \(0, 1\], got " + repr(bad)[:3]):
        heads_kept(12, bad)
    with pytest.raises(ConfigError, match="depth multiplier"):
        kept_layers(12, bad)


def test_depth_keeping_no_layer_is_an_error():
    with pytest.raises(ConfigError, match="depth multiplier 0.1 keeps no layer of a 4-layer"):
        kept_layers(4, 0.1)
    with pytest.raises(ConfigError, match="depth multiplier 0.1 keeps no layer"):
        depth_layer_mapping(4, 0.1)


def test_subnetwork_shape_and_config_with_per_layer_widths():
    config = NezhaConfig(vocab_size=50, hidden_size=8, num_layers=4, num_heads=4, head_dim=3,
                         intermediate_size=20, layer_num_heads=[4, 2, 4, 1], layer_intermediate_sizes=[20, 10, 16, 8])
    shape = subnetwork_shape(config, 0.5, 0.5)
    assert shape.layers == (0, 2)
    assert shape.heads == (2, 2) and shape.intermediate == (10, 8)
    assert shape.name == "w0.5_d0.5"
    smaller = subnetwork_config(config, shape)
    assert (smaller.num_layers, smaller.layer_num_heads, smaller.layer_intermediate_sizes) == (2, [2, 2], [10, 8])
    assert smaller.attention_head_size == 3 and smaller.hidden_size == 8
    with pytest.raises(ConfigError, match=r"layer 1: width multiplier 0.25 keeps round\(2 \* 0.25\) = 0 of 2 heads; only widths above 0.25 keep"):
        subnetwork_shape(config, 0.25, 1.0)


def test_dynabert_config_defaults_and_errors_name_the_key():
    config = DynaBertConfig.from_dict({}, "x.yaml")
    assert config.widths() == (1.0, 0.75, 0.5, 0.25) and config.depths() == (1.0,)
    assert config.loss_weights() == (1.0, 0.1)
    stage2 = DynaBertConfig.from_dict({"stage": "width_depth", "width_multipliers": [0.5, 1]}, "x.yaml")
    assert stage2.widths() == (1.0, 0.5) and stage2.depths() == (1.0, 0.75, 0.5)
    assert stage2.loss_weights() == (1.0, 1.0)
    cases = [({"width_multipliers": [1.0, 0.0]}, r"x.yaml: dynabert.width_multipliers: .*got 0.0"),
             ({"depth_multipliers": [1.5]}, r"dynabert.depth_multipliers: .*got 1.5"),
             ({"depth_multipliers": []}, r"dynabert.depth_multipliers: must list"),
             ({"width_multipliers": [0.5, 0.5]}, r"dynabert.width_multipliers: has repeated"),
             ({"stage": "depth"}, r"dynabert.stage: must be one of"),
             ({"teacher": "paper"}, r"dynabert.teacher: must be one of"),
             ({"stage1_hidden_weight": -1.0}, r"dynabert.stage1_hidden_weight: must be >= 0"),
             ({"stage2_logits_weight": 0.0, "stage2_hidden_weight": 0.0}, r"dynabert.stage2_logits_weight: both"),
             ({"importance_examples": 0}, r"dynabert.importance_examples: must be >= 1"),
             ({"widths": [1.0]}, r"unknown key\(s\) dynabert.widths"),
             ({"importance_batch_size": "8"}, r"dynabert.importance_batch_size: expected an integer")]
    for values, message in cases:
        with pytest.raises(ConfigError, match=message):
            DynaBertConfig.from_dict(values, "x.yaml")
