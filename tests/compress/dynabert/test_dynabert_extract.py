"""Extraction gives an ordinary, physically smaller model whose outputs equal the sliced forward; it survives the
model-directory round trip; untrained sizes warn, impossible ones are errors naming the value."""
import warnings

import numpy as np
import pytest

from dynabert_tiny import batch, numpy_weights, outputs, random_model, tiny_config
from ms_nlp_compress.compress.dynabert.elastic import ElasticModel
from ms_nlp_compress.compress.dynabert.extract import extract, extraction_record
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.checkpoint import load_model_dir, save_model_dir
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification


def parameter_count(model):
    return sum(int(np.prod(param.shape)) for name, param in model.parameters_and_names()
               if "rng_counter" not in name)


def test_extracted_model_equals_the_sliced_forward_and_round_trips(graph_mode, tmp_path):
    full = random_model(tiny_config(), seed=9)
    small, config, shape = extract(full, 0.5, 0.75, trained_widths=[1.0, 0.5], trained_depths=[1.0, 0.75])
    assert type(small) is NezhaForSequenceClassification
    assert (config.num_layers, config.layer_num_heads, config.layer_intermediate_sizes) == (3, [2, 2, 2], [6, 6, 6])
    assert config.attention_head_size == 3 and shape.layers == (0, 1, 2)
    query = dict(small.parameters_and_names())["bert.encoder.layers.2.attention.self_attention.query.weight"]
    assert tuple(query.shape) == (6, 8)  # 2 heads of size 3: physically smaller
    assert parameter_count(small) < parameter_count(full)
    # The full model's leading slices, read independently: layer 2 of the extract is full layer 2.
    full_query = numpy_weights(full)["bert.encoder.layers.2.attention.self_attention.query.weight"]
    np.testing.assert_array_equal(query.asnumpy(), full_query[:6])

    sliced = ElasticModel(full).subnetwork(0.5, 0.75)  # the sliced forward (SlicedDense views)
    inputs = batch()
    expected = sliced(*inputs)[0].asnumpy()
    got = small(*inputs)[0].asnumpy()
    assert np.abs(expected).max() > 0.1
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

    save_model_dir(small, tmp_path / "w0.5_d0.75", config, meta=extraction_record(shape))
    loaded, document = load_model_dir(tmp_path / "w0.5_d0.75")
    assert document["dynabert"] == {"width": 0.5, "depth": 0.75, "layers": [0, 1, 2], "heads": [2, 2, 2],
                                    "intermediate": [6, 6, 6]}
    loaded.set_train(False)
    np.testing.assert_allclose(loaded(*inputs)[0].asnumpy(), expected, rtol=1e-5, atol=1e-5)


def test_untrained_sizes_warn_and_still_extract():
    full = random_model(tiny_config(), seed=10, hidden_states=False)
    with pytest.warns(UserWarning, match=r"width 0.6 is not one of the trained widths \[1.0, 0.5\]"):
        small, config, _ = extract(full, 0.6, 1.0, trained_widths=[1.0, 0.5], trained_depths=[1.0])
    assert config.layer_num_heads == [2] * 4  # round(4 * 0.6) = 2
    with pytest.warns(UserWarning, match=r"depth 0.5 is not one of the trained depths \[1.0\]"):
        extract(full, 1.0, 0.5, trained_widths=[1.0], trained_depths=[1.0])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # trained sizes, or no lists given: silent
        extract(full, 0.5, 1.0, trained_widths=[1.0, 0.5], trained_depths=[1.0])
        extract(full, 0.25, 0.5)


@pytest.mark.parametrize("width,depth,message", [
    (0.1, 1.0, r"width multiplier 0.1 keeps round\(4 \* 0.1\) = 0 of 4 heads"),
    (0.0, 1.0, r"width multiplier must be a number in \(0, 1\], got 0.0"),
    (1.25, 1.0, r"width multiplier must be a number in \(0, 1\], got 1.25"),
    (1.0, 1.5, r"depth multiplier must be a number in \(0, 1\], got 1.5"),
    (1.0, 0.0, r"depth multiplier must be a number in \(0, 1\], got 0.0"),
    (1.0, -0.5, r"depth multiplier must be a number in \(0, 1\], got -0.5"),
    (1.0, 0.1, r"depth multiplier 0.1 keeps no layer of a 4-layer model"),
])
def test_impossible_sizes_are_errors_naming_the_value(width, depth, message):
    full = random_model(tiny_config(), seed=11, hidden_states=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the error comes first, not a warning about an untrained size
        with pytest.raises(ConfigError, match=message):
            extract(full, width, depth, trained_widths=[1.0], trained_depths=[1.0])
