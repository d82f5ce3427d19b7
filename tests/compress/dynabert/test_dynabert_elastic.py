"""Sub-networks in graph mode equal freshly built smaller models loaded with the leading slices, and share the full
model's Parameters (an update through one is seen by the full model and by the others)."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import nn

from dynabert_tiny import (batch, fresh_reference, numpy_weights, outputs, random_model, tiny_config)
from ms_nlp_compress.compress.dynabert.elastic import ElasticModel, build_subnetwork, names_kept
from ms_nlp_compress.compress.dynabert.sizes import SubnetworkShape
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.nezha import NezhaModel


# (width, depth, kept layers, heads per kept layer, FFN per kept layer) on 4 layers x 4 heads x FFN 12, written out
# by hand from the reference rules (round(4w) heads, 12 * heads / 4 neurons, layers floor(i / d)).
CASES = [(0.5, 0.5, (0, 2), (2, 2), (6, 6)),
         (0.75, 0.75, (0, 1, 2), (3, 3, 3), (9, 9, 9)),
         (0.25, 1.0, (0, 1, 2, 3), (1, 1, 1, 1), (3, 3, 3, 3))]


@pytest.mark.parametrize("width,depth,layers,heads,intermediate", CASES)
def test_subnetwork_equals_fresh_smaller_model_in_graph_mode(graph_mode, width, depth, layers, heads,
                                                             intermediate):
    config = tiny_config()
    full = random_model(config, seed=3)
    sub = ElasticModel(full).subnetwork(width, depth, hidden_states=True)
    reference = fresh_reference(config, layers, heads, intermediate, numpy_weights(full))
    inputs = batch()
    expected = outputs(reference, inputs)
    actual = outputs(sub, inputs)
    assert len(actual) == len(layers) + 2  # logits, embeddings, one state per kept layer
    assert np.abs(expected[0]).max() > 0.1  # random weights: a tolerance of 1e-5 is meaningful
    for got, want in zip(actual, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_bert_positions_and_per_layer_widths(graph_mode):
    """Absolute positions (plain BERT) and a full model whose layers already differ in width."""
    config = tiny_config("absolute", layer_num_heads=[4, 2, 4, 3], layer_intermediate_sizes=[12, 8, 10, 12])
    full = random_model(config, seed=4)
    sub = ElasticModel(full).subnetwork(0.5, 0.5, hidden_states=True)
    # layers 0 and 2: round(4 * 0.5) = 2 heads each; FFN 12 * 2 // 4 = 6 and 10 * 2 // 4 = 5
    reference = fresh_reference(config, (0, 2), (2, 2), (6, 5), numpy_weights(full))
    for got, want in zip(outputs(sub, batch(2)), outputs(reference, batch(2))):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_subnetwork_compiles_once_for_dynamic_shapes(graph_mode):
    """The trainer declares dynamic batch/sequence sizes (dynamic padding): one sub-network graph serves them all."""
    config = tiny_config()
    full = random_model(config, seed=13)
    sub = ElasticModel(full).subnetwork(0.5, 0.5, hidden_states=True)
    spec = ms.Tensor(shape=[None, None], dtype=ms.int32)
    sub.set_inputs(spec, spec, spec)
    reference = fresh_reference(config, (0, 2), (2, 2), (6, 6), numpy_weights(full))
    for batch_size, length in ((2, 5), (3, 7)):
        inputs = batch(seed=length, batch_size=batch_size, length=length)
        for got, want in zip(outputs(sub, inputs), outputs(reference, inputs)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


class LogitsLoss(nn.Cell):
    def __init__(self, network):
        super().__init__()
        self.network = network

    def construct(self, input_ids, attention_mask, token_type_ids):
        logits = self.network(input_ids, attention_mask, token_type_ids)[0]
        return (logits * logits).sum()


class GradStep(nn.Cell):
    """One compiled gradient of the loss with respect to `weights`."""

    def __init__(self, loss, weights):
        super().__init__(auto_prefix=False)
        self.grad_fn = ms.value_and_grad(loss, None, weights)

    def construct(self, *inputs):
        return self.grad_fn(*inputs)[1]


def test_subnetworks_share_parameters_and_see_each_others_updates(graph_mode):
    config = tiny_config()
    full = random_model(config, seed=5)
    names = [param.name for param in full.get_parameters()]
    elastic = ElasticModel(full)
    trained = elastic.subnetwork(0.5, 0.5, hidden_states=True)
    other = elastic.subnetwork(0.75, 1.0, hidden_states=True)
    full_ids = {id(param) for param in full.get_parameters()}
    assert trained.trainable_params() and all(id(param) in full_ids for param in trained.get_parameters())
    assert len(other.trainable_params()) == len(full.trainable_params())  # every layer is kept at depth 1.0
    inputs = batch()
    other_before = outputs(other, inputs)  # compiled BEFORE the update
    full_before = outputs(full, inputs)

    weights = trained.trainable_params()
    with names_kept(full):
        loss = LogitsLoss(trained)  # nesting renames shared Parameters; names_kept puts the full names back
    assert [param.name for param in full.get_parameters()] == names
    before = numpy_weights(full)
    grads = GradStep(loss, weights)(*inputs)
    nn.SGD(weights, learning_rate=0.1)(grads)
    after = numpy_weights(full)

    by_name = {param.name: grad.asnumpy() for param, grad in zip(weights, grads)}
    for name, value in after.items():
        if name in by_name:
            np.testing.assert_allclose(value, before[name] - 0.1 * by_name[name], rtol=0, atol=1e-6)
        else:
            np.testing.assert_array_equal(value, before[name])
    # Gradients reach only the leading slices of the kept layers; the dropped layer 1 and the tail rows stay put.
    query = "bert.encoder.layers.0.attention.self_attention.query.weight"
    assert np.abs(after[query][:6] - before[query][:6]).max() > 0
    np.testing.assert_array_equal(after[query][6:], before[query][6:])
    layer_1 = [name for name in after if ".layers.1." in name and "rng_counter" not in name]
    assert layer_1 and all(np.array_equal(after[name], before[name]) for name in layer_1)

    other_after = outputs(other, inputs)
    reference = fresh_reference(config, (0, 1, 2, 3), (3,) * 4, (9,) * 4, after)
    assert np.abs(other_after[0] - other_before[0]).max() > 1e-3  # the other graph sees the new values ...
    for got, want in zip(other_after, outputs(reference, inputs)):  # ... and they are exactly the update's
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.abs(outputs(full, inputs)[0] - full_before[0]).max() > 1e-3


def test_subnetwork_errors_name_the_problem():
    full = random_model(tiny_config(), seed=6)
    with pytest.raises(ConfigError, match="width multiplier 0.1 keeps round"):
        ElasticModel(full).subnetwork(0.1, 1.0)
    with pytest.raises(ConfigError, match=r"depth multiplier must be a number in \(0, 1\], got 1.5"):
        ElasticModel(full).subnetwork(1.0, 1.5)
    with pytest.raises(ConfigError, match="needs a NezhaForSequenceClassification, got NezhaModel"):
        ElasticModel(NezhaModel(tiny_config()))
    with pytest.raises(ConfigError, match="got NezhaModel"):
        build_subnetwork(NezhaModel(tiny_config()), SubnetworkShape(1.0, 1.0, (0,), (4,), (12,)))
