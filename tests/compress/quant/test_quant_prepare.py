"""quant.prepare: names kept, float identity, numpy-twin parity at every quant point, STE gradients in graph mode."""
import os
import sys

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

sys.path.insert(0, os.path.dirname(__file__))
import quant_twins  # noqa: E402

from ms_nlp_compress.compress.quant.config import QuantConfig, WeightQuantConfig  # noqa: E402
from ms_nlp_compress.compress.quant.prepare import (FakeQuantDense, FakeQuantEmbedding, TiedTableQuant,  # noqa: E402
                                                    prepare, weight_quantizer)
from ms_nlp_compress.compress.quant.ste import MinMaxQuantSTE, SymmetricQuantSTE  # noqa: E402
from ms_nlp_compress.config import NezhaConfig  # noqa: E402
from ms_nlp_compress.errors import ConfigError  # noqa: E402
from ms_nlp_compress.models.checkpoint import cell_weights  # noqa: E402
from ms_nlp_compress.models.nezha import NezhaForMaskedLM, NezhaForSequenceClassification  # noqa: E402


def tiny(relative=True, layers=2):
    return NezhaConfig(vocab_size=40, hidden_size=16, num_layers=layers, num_heads=4, intermediate_size=24,
                       max_position_embeddings=16, max_relative_position=3, hidden_dropout=0.0,
                       attention_dropout=0.0, position_embedding="relative" if relative else "absolute")


def batch(seed=1, size=3, length=7, vocab=40):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (size, length)).astype(np.int32)
    mask = np.ones((size, length), np.int32)
    mask[1, 5:] = 0
    types = np.zeros((size, length), np.int32)
    types[:, 4:] = 1
    return ids, mask, types


def classifier(config, seed=0):
    ms.set_seed(seed)
    model = NezhaForSequenceClassification(config, 3)
    # Widen the weights (init range 0.02 would leave every TWN threshold tiny): realistic spread, some outliers.
    rng = np.random.default_rng(seed)
    for param in model.trainable_params():
        if param.name.endswith(("weight", "embedding_table")):
            param.set_data(Tensor((rng.standard_normal(param.shape) * 0.3).astype(np.float32)))
    model.set_train(False)
    return model


def run(model, arrays):
    return model(*[Tensor(a) for a in arrays])


def test_names_unchanged_and_fp_preset_reproduces_float_model_exactly(execution_mode):
    config = tiny()
    arrays = batch()
    reference = [run(classifier(config), arrays)[0].asnumpy()]  # a twin: prepare refuses a model that already ran
    model = classifier(config)
    names = [(name, param.name) for name, param in model.parameters_and_names()]
    prepare(model, QuantConfig.preset("fp"))
    kinds = {type(cell) for _, cell in model.cells_and_names()}
    assert FakeQuantDense in kinds and FakeQuantEmbedding in kinds  # really swapped, not skipped
    assert [(name, param.name) for name, param in model.parameters_and_names()] == names
    np.testing.assert_array_equal(run(model, arrays)[0].asnumpy(), reference[0])


def test_2_2_8_keeps_names_and_trainable_set_and_changes_the_output():
    model = classifier(tiny())
    arrays = batch()
    before = run(model, arrays)[0].asnumpy()
    trainable = [p.name for p in model.trainable_params()]
    names = [name for name, _ in model.parameters_and_names()]
    prepare(model, QuantConfig.preset("2-2-8"))
    assert [name for name, _ in model.parameters_and_names()] == names
    assert [p.name for p in model.trainable_params()] == trainable
    assert np.abs(run(model, arrays)[0].asnumpy() - before).max() > 1e-3
    with pytest.raises(ConfigError, match="already prepared"):
        prepare(model, QuantConfig())


@pytest.mark.parametrize("relative", [True, False], ids=["nezha", "bert"])
@pytest.mark.parametrize("preset,activation", [("2-2-8", "symmetric"), ("8-8-8", "symmetric"),
                                               ("4-4-8", "minmax")])
def test_fake_quant_forward_matches_numpy_twin(relative, preset, activation):
    config = tiny(relative)
    model = classifier(config, seed=3)
    weights = cell_weights(model)
    quant = QuantConfig.from_dict({"preset": preset, "activation": {"method": activation}})
    prepare(model, quant)
    arrays = batch(seed=5)
    clip_value = quant.activation_clip
    if activation == "symmetric":
        act = lambda x: quant_twins.sym(x, 8, False, clip_value)  # noqa: E731
    else:
        act = lambda x: quant_twins.minmax(x, 8, False, clip_value)  # noqa: E731
    expected = quant_twins.quantized_classifier_forward(weights, config, quant, *arrays, act)
    np.testing.assert_allclose(run(model, arrays)[0].asnumpy(), expected, atol=2e-4)


class Recorder(nn.Cell):
    """Wraps an activation quantizer and keeps its (input, output) pairs (PyNative only)."""

    def __init__(self, inner, log, name):
        super().__init__()
        self.inner = inner
        self.log = log
        self.point = name

    def construct(self, x):
        out = self.inner(x)
        self.log.append((self.point, x.asnumpy(), out.asnumpy()))
        return out


def test_every_quant_point_weight_and_embedding_row_matches_its_twin():
    config = tiny()
    model = classifier(config, seed=7)
    quant = QuantConfig.from_dict({"encoder": {"method": "sym", "bits": 4},
                                   "pooler": {"method": "log", "bits": 4},
                                   "embedding": {"method": "twn", "granularity": "row"}})
    prepare(model, quant)
    log = []
    points = []
    for name, cell in list(model.cells_and_names()):
        if isinstance(cell, (SymmetricQuantSTE, MinMaxQuantSTE)) and "weight_quant" not in name:
            parent_name, attribute = name.rsplit(".", 1)
            dict(model.cells_and_names())[parent_name].insert_child_to_cell(attribute, Recorder(cell, log, name))
            points.append(name)
    layer_points = {p.rsplit(".", 1)[1] for p in points if ".layers.0." in p}
    assert {"query_quant", "key_quant", "probs_quant", "value_quant", "input_quant"} <= layer_points
    ids, mask, types = batch(seed=2)
    run(model, (ids, mask, types))
    assert sorted({entry[0] for entry in log}) == sorted(points)  # every point ran
    for name, x, out in log:
        np.testing.assert_allclose(out, quant_twins.sym(x, 8, False, 2.5), atol=1e-6, err_msg=name)
    cells = dict(model.cells_and_names())
    for name, cell in cells.items():
        if isinstance(cell, FakeQuantDense):
            group = "pooler" if "pooler" in name else "encoder"
            twin = quant_twins.weight_twin(getattr(quant, group))
            np.testing.assert_allclose(cell.quantized_weight().asnumpy(), twin(cell.weight.asnumpy()), atol=1e-6,
                                       err_msg=name)
    embedding = cells["bert.embeddings.word_embeddings"]
    table = embedding.embedding_table.asnumpy()
    rows = embedding(Tensor(ids)).asnumpy()
    for index, token in enumerate(ids.ravel()):
        np.testing.assert_allclose(rows.reshape(-1, 16)[index], quant_twins.twn(table[token], True), atol=1e-6)


def test_tied_decoder_reads_the_quantized_table(graph_mode):
    config = tiny()
    ms.set_seed(0)
    model = NezhaForMaskedLM(config)
    model.set_train(False)
    prepare(model, QuantConfig.from_dict({"activation": {"method": "none"}}))
    assert isinstance(model.word_table_quant, TiedTableQuant)
    ids, mask, types = batch()
    hidden = model.bert(Tensor(ids), Tensor(mask), Tensor(types))[0]
    logits = model(Tensor(ids), Tensor(mask), Tensor(types))[0].asnumpy()
    head = model.lm_head
    transformed = head.layer_norm(head.activation(head.dense(hidden))).asnumpy()
    table = quant_twins.twn(model.bert.embeddings.word_embeddings.embedding_table.asnumpy(), per_row=True)
    np.testing.assert_allclose(logits, transformed @ table.T + head.bias.asnumpy(), atol=1e-5)


class DenseLoss(nn.Cell):
    def __init__(self, dense, upstream):
        super().__init__()
        self.dense = dense
        self.upstream = Tensor(upstream)

    def construct(self, x):
        return (self.dense(x) * self.upstream).sum()


def test_ste_gradients_in_graph_mode_match_numpy_and_vanish_outside_the_clip(graph_mode):
    rng = np.random.default_rng(0)
    dense = nn.Dense(6, 4)
    weight = rng.standard_normal((4, 6)).astype(np.float32)
    weight[0, 0], weight[2, 3] = 3.0, -2.7  # outside +-2.5: saturated, zero gradient
    dense.weight.set_data(Tensor(weight))
    quant = QuantConfig()
    prepare_cell = FakeQuantDense(dense, weight_quantizer(quant.encoder, 2.5), SymmetricQuantSTE(8, False, 2.5),
                                  quant.encoder)
    x = rng.standard_normal((5, 6)).astype(np.float32) * 1.5
    x[1, 2] = 4.0  # an activation outside the clip: zero input gradient there
    upstream = rng.standard_normal((5, 4)).astype(np.float32)
    loss = DenseLoss(prepare_cell, upstream)
    grad_fn = ms.grad(loss, grad_position=0, weights=[dense.weight])
    dx, (dw,) = grad_fn(Tensor(x))
    qx, qw = quant_twins.sym(x, 8), quant_twins.twn(weight)
    np.testing.assert_allclose(dw.asnumpy(), (upstream.T @ qx) * (np.abs(weight) < 2.5), atol=1e-5)
    np.testing.assert_allclose(dx.asnumpy(), (upstream @ qw) * (np.abs(x) < 2.5), atol=1e-5)
    assert dw.asnumpy()[0, 0] == 0 and dw.asnumpy()[2, 3] == 0 and dx.asnumpy()[1, 2] == 0
    assert np.abs(dw.asnumpy()).min() == 0 and np.count_nonzero(dw.asnumpy()) == 22


def test_gradients_reach_every_weight_of_a_prepared_model_in_graph_mode(graph_mode):
    model = classifier(tiny(), seed=1)
    prepare(model, QuantConfig())
    model.set_train(True)
    ids, mask, types = batch()

    def loss_fn(a, b, c):
        return (model(a, b, c)[0] ** 2).sum()

    grads = ms.grad(loss_fn, grad_position=None, weights=model.trainable_params())(
        Tensor(ids), Tensor(mask), Tensor(types))
    for param, grad in zip(model.trainable_params(), grads):
        if "token_type" in param.name or "rng_counter" in param.name:
            continue
        assert np.abs(grad.asnumpy()).max() > 0, param.name


def test_prepare_refuses_a_model_that_already_ran_in_graph_mode(graph_mode):
    """MindSpore keeps running the graph it compiled for a Cell after its children are swapped: a 2-2-8 prepare of a
    model that already ran would silently keep computing the float model. prepare says so instead, naming itself."""
    config = tiny()
    arrays = batch()
    ran = classifier(config)
    float_out = run(ran, arrays)[0].asnumpy()
    with pytest.raises(ConfigError, match=r"quant\.prepare: NezhaForSequenceClassification already ran in graph mode"):
        prepare(ran, QuantConfig.preset("2-2-8"))
    assert not any(isinstance(c, FakeQuantDense) for _, c in ran.cells_and_names())  # refused before any swap
    fresh = prepare(classifier(config), QuantConfig.preset("2-2-8"))
    assert np.abs(run(fresh, arrays)[0].asnumpy() - float_out).max() > 1e-3  # what the swap really changes


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"quant\.encoder\.bits"):
        QuantConfig.from_dict({"encoder": {"method": "twn", "bits": 4}}, "q.yaml")
    with pytest.raises(ConfigError, match=r"q\.yaml.*quant\.embedding\.granularity"):
        QuantConfig.from_dict({"embedding": {"granularity": "column"}}, "q.yaml")
    with pytest.raises(ConfigError, match=r"quant\.activation\.method"):
        QuantConfig.from_dict({"activation": {"method": "int8"}})
    with pytest.raises(ConfigError, match=r"quant\.encoder\.colour"):
        QuantConfig.from_dict({"encoder": {"colour": 1}})
    with pytest.raises(ConfigError, match=r"quant\.preset"):
        QuantConfig.from_dict({"preset": "3-3-3"})
    with pytest.raises(ConfigError, match=r"quant\.weight_clip"):
        QuantConfig.from_dict({"weight_clip": -1})
    mixed = QuantConfig.from_dict({"preset": "2-2-8", "embedding": {"method": "sym", "bits": 4}})
    assert mixed.encoder == WeightQuantConfig("twn", 2, "tensor")
    assert mixed.embedding == WeightQuantConfig("sym", 4, "row")
