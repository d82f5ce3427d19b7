"""The backbone against an independent numpy forward (tests/models/numpy_bert.py)."""
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor

import numpy_bert
from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.checkpoint import hf_to_native, load_weights
from ms_nlp_compress.models.nezha import (NezhaForMaskedLM, NezhaForSequenceClassification, NezhaModel,
                                          relative_position_table)

TOL = 2e-5


def tiny(relative, **overrides):
    values = dict(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                  max_position_embeddings=32, type_vocab_size=2, max_relative_position=3,
                  position_embedding="relative" if relative else "absolute", hidden_dropout=0.0,
                  attention_dropout=0.0)
    values.update(overrides)
    return NezhaConfig(**values)


def reference_config(config):
    return dict(vocab_size=config.vocab_size, hidden_size=config.hidden_size, num_layers=config.num_layers,
                num_heads=config.num_heads, intermediate_size=config.intermediate_size,
                type_vocab_size=config.type_vocab_size, max_position_embeddings=config.max_position_embeddings,
                layer_norm_eps=config.layer_norm_eps, relative=config.position_embedding == "relative",
                max_relative_position=config.max_relative_position)


def batch(seed=1, size=3, length=9, vocab=50):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (size, length)).astype(np.int32)
    mask = np.ones((size, length), np.int32)
    mask[1, 6:] = 0  # padding in one row, so the mask path is exercised
    mask[2, 3:] = 0
    types = np.zeros((size, length), np.int32)
    types[:, length // 2:] = 1
    return ids, mask, types


def test_relative_table_follows_the_reference_formula():
    table = relative_position_table(7, 6)
    for p in range(7):
        for t in range(3):
            angle = p / 10000 ** (2 * t / 6)
            assert table[p, 2 * t] == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[p, 2 * t + 1] == pytest.approx(math.cos(angle), abs=1e-6)
    assert relative_position_table(5, 5).shape == (5, 5)  # odd head dims are legal


@pytest.mark.parametrize("relative", [True, False], ids=["nezha-relative", "bert-absolute"])
def test_forward_matches_numpy_reference(relative, execution_mode):
    config = tiny(relative)
    hf = numpy_bert.random_hf_weights(reference_config(config), seed=3, relative=relative)
    model = NezhaModel(config, output_hidden_states=True, output_attentions=True)
    weights, unmapped, ignored = hf_to_native(hf)
    load_weights(model, weights, unmapped=unmapped)
    model.set_train(False)
    ids, mask, types = batch()
    sequence, pooled, hidden, scores = model(Tensor(ids), Tensor(mask), Tensor(types))
    ref_sequence, ref_pooled, ref_hidden, ref_scores = numpy_bert.forward(hf, reference_config(config), ids, mask,
                                                                          types)
    np.testing.assert_allclose(sequence.asnumpy(), ref_sequence, atol=TOL)
    np.testing.assert_allclose(pooled.asnumpy(), ref_pooled, atol=TOL)
    assert len(hidden) == config.num_layers + 1 and len(scores) == config.num_layers
    for ours, ref in zip(hidden, ref_hidden):
        np.testing.assert_allclose(ours.asnumpy(), ref, atol=TOL)
    for ours, ref in zip(scores, ref_scores):
        # pre-softmax, scaled, masked: padded keys carry the -10000 bias
        np.testing.assert_allclose(ours.asnumpy(), ref, atol=1e-3, rtol=1e-5)
    assert scores[0].asnumpy()[1, :, :, 6:].max() < -1000


def test_relative_positions_change_the_output_but_distance_is_clipped():
    """Relative attention is position-aware; distances beyond K all look alike."""
    config = tiny(True, max_relative_position=2)
    hf = numpy_bert.random_hf_weights(reference_config(config), seed=4, relative=True)
    _, _, _, scores = numpy_bert.forward(hf, reference_config(config), *batch(length=8))
    model = NezhaModel(config, output_attentions=True)
    load_weights(model, hf_to_native(hf)[0])
    model.set_train(False)
    ours = model(*[Tensor(a) for a in batch(length=8)])[3]
    np.testing.assert_allclose(ours[0].asnumpy(), scores[0], atol=1e-3)
    rel = numpy_bert.relative_embeddings(8, 2, 4)
    assert np.array_equal(rel[0, 3], rel[0, 7]) and not np.array_equal(rel[0, 1], rel[0, 2])


def test_per_layer_widths_and_independent_head_dim(graph_mode):
    """DynaBERT sub-networks: num_heads * head_dim != hidden_size, different heads and FFN size per layer."""
    layer_heads, layer_ffn = [2, 3], [7, 11]
    config = tiny(True, head_dim=5, layer_num_heads=layer_heads, layer_intermediate_sizes=layer_ffn)
    hf = numpy_bert.random_hf_weights(reference_config(config), seed=5, head_dim=5, layer_heads=layer_heads,
                                      layer_ffn=layer_ffn, relative=True)
    model = NezhaModel(config)
    load_weights(model, hf_to_native(hf)[0])
    model.set_train(False)
    ids, mask, types = batch()
    ours = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
    ref = numpy_bert.forward(hf, reference_config(config), ids, mask, types, head_dim=5, layer_heads=layer_heads)[0]
    np.testing.assert_allclose(ours, ref, atol=TOL)


def test_head_mask_multiplies_attention_probabilities(graph_mode):
    config = tiny(True)
    hf = numpy_bert.random_hf_weights(reference_config(config), seed=6, relative=True)
    model = NezhaModel(config)
    load_weights(model, hf_to_native(hf)[0])
    model.set_train(False)
    ids, mask, types = batch()
    head_mask = np.ones((2, 4), np.float32)
    head_mask[0, 1] = 0.0
    head_mask[1, 3] = 0.5
    ours = model(Tensor(ids), Tensor(mask), Tensor(types), Tensor(head_mask))[0].asnumpy()
    ref = numpy_bert.forward(hf, reference_config(config), ids, mask, types, head_mask=head_mask)[0]
    np.testing.assert_allclose(ours, ref, atol=TOL)
    plain = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
    assert np.abs(plain - ours).max() > 1e-3


def test_dynamic_batch_and_sequence_length(graph_mode):
    """One compiled graph serves every (batch, length): set_inputs with dynamic dims."""
    config = tiny(True)
    hf = numpy_bert.random_hf_weights(reference_config(config), seed=7, relative=True)
    model = NezhaModel(config)
    load_weights(model, hf_to_native(hf)[0])
    model.set_train(False)
    dynamic = Tensor(shape=[None, None], dtype=ms.int32)
    model.set_inputs(dynamic, dynamic, dynamic)
    for size, length in [(1, 5), (3, 9), (2, 17)]:
        ids, mask, types = batch(seed=size, size=max(size, 3), length=length)
        ids, mask, types = ids[:size], mask[:size], types[:size]
        ours = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
        ref = numpy_bert.forward(hf, reference_config(config), ids, mask, types)[0]
        np.testing.assert_allclose(ours, ref, atol=TOL)


def test_masked_lm_decoder_is_tied_to_word_embeddings(graph_mode):
    config = tiny(True)
    model = NezhaForMaskedLM(config)
    model.set_train(False)
    ids, mask, types = batch()
    positions = np.array([[1, 2], [0, 5], [2, 2]], np.int32)
    full = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()  # (B, L, V)
    gathered = model(Tensor(ids), Tensor(mask), Tensor(types), Tensor(positions))[0].asnumpy()  # (B, P, V)
    np.testing.assert_allclose(gathered, np.take_along_axis(full, positions[:, :, None], 1), atol=1e-5)
    names = [name for name, _ in model.parameters_and_names()]
    assert not any("decoder" in n for n in names) and "lm_head.bias" in names
    # The logits are hidden @ table^T + bias: recompute them from the transform output and the table.
    table = model.bert.embeddings.word_embeddings.embedding_table.asnumpy()
    sequence = model.bert(Tensor(ids), Tensor(mask), Tensor(types))[0]
    head = model.lm_head
    transformed = head.layer_norm(head.activation(head.dense(sequence))).asnumpy()
    np.testing.assert_allclose(full, transformed @ table.T + head.bias.asnumpy(), atol=1e-4)


def test_classification_head_shapes_and_regression(graph_mode):
    config = tiny(False)
    ids, mask, types = batch()
    logits, hidden, scores = NezhaForSequenceClassification(config, num_labels=3)(Tensor(ids), Tensor(mask),
                                                                                  Tensor(types))
    assert logits.shape == (3, 3) and hidden == () and scores == ()
    assert NezhaForSequenceClassification(config, num_labels=1)(Tensor(ids))[0].shape == (3, 1)
    with pytest.raises(ValueError, match="num_labels"):
        NezhaForSequenceClassification(config, num_labels=0)


@pytest.mark.parametrize("field,value,message", [
    ("num_heads", 5, "not divisible"),
    ("hidden_act", "swish", "hidden_act"),
    ("position_embedding", "rotary", "position_embedding"),
    ("hidden_dropout", 1.0, "hidden_dropout"),
    ("layer_num_heads", [1, 2, 3], "layer_num_heads"),
    ("head_dim", 0, "head_dim"),
])
def test_invalid_configs_name_the_field(field, value, message):
    with pytest.raises(ConfigError, match=message):
        NezhaModel(tiny(True, **{field: value}))
