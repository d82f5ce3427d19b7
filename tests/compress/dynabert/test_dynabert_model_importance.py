"""Whole-model importance against finite differences of the model's own loss, and whole-model rewiring: exact on the
real MiniLM weights, with the importance of the rewired model the permuted importance of the original."""
import numpy as np
import pytest
from mindspore import Tensor

from dynabert_tiny import batch, numpy_weights, random_model, tiny_config
from ms_nlp_compress.compress.dynabert.importance import ImportanceScorer, held_out_rows
from ms_nlp_compress.compress.dynabert.rewire import rewire_model
from ms_nlp_compress.models.checkpoint import load_pretrained, pretrained_config
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification


def numpy_loss(model, inputs, labels, head_mask):
    """Mean cross-entropy of the model's float32 logits, in float64."""
    logits = model(*inputs, Tensor(head_mask.astype(np.float32)))[0].asnumpy().astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    return -log_probs[np.arange(len(labels)), labels].mean()


def test_model_importance_equals_finite_differences(graph_mode):
    """Head score = |dL/d mask|; FFN score = |dL/dt| for t scaling neuron n's row of W1 and b1[n] (pre-activation
    gate) + |dL/dt| for t scaling its column of W2 (activation gate), each by central differences."""
    model = random_model(tiny_config(num_layers=2), seed=7)
    batches = [(*batch(seed), Tensor(np.array(labels, np.int32)))
               for seed, labels in ((1, [0, 2]), (2, [1, 1]))]
    importance = ImportanceScorer(model)(batches)
    assert importance.batches == 2
    step = 1e-2
    ones = np.ones((2, 4))
    expected_heads = np.zeros((2, 4))
    expected_neurons = np.zeros((2, 12))
    params = dict(model.parameters_and_names())
    for *inputs, labels in batches:
        labels = labels.asnumpy()

        def loss(mask=ones):
            return numpy_loss(model, inputs, labels, mask)

        for layer in range(2):
            for head in range(4):
                plus, minus = ones.copy(), ones.copy()
                plus[layer, head] += step
                minus[layer, head] -= step
                expected_heads[layer, head] += abs(loss(plus) - loss(minus)) / (2 * step)
            prefix = f"bert.encoder.layers.{layer}.ffn."
            gates = [((prefix + "intermediate.weight", 0), (prefix + "intermediate.bias", 0)),
                     ((prefix + "output.weight", 1),)]
            for neuron in range(12):
                for gate in gates:
                    values = {}
                    for sign in (1, -1):
                        saved = {name: params[name].asnumpy().copy() for name, _ in gate}
                        for name, axis in gate:
                            scaled = saved[name].copy()
                            index = (neuron,) if scaled.ndim == 1 else \
                                ((neuron, slice(None)) if axis == 0 else (slice(None), neuron))
                            scaled[index] *= 1 + sign * step
                            params[name].set_data(Tensor(scaled))
                        values[sign] = loss()
                        for name, _ in gate:
                            params[name].set_data(Tensor(saved[name]))
                    expected_neurons[layer, neuron] += abs(values[1] - values[-1]) / (2 * step)
    assert expected_heads.max() > 1e-2 and expected_neurons.max() > 1e-2
    np.testing.assert_allclose(np.stack(importance.heads), expected_heads, rtol=2e-2, atol=3e-4)
    np.testing.assert_allclose(np.stack(importance.neurons), expected_neurons, rtol=2e-2, atol=3e-4)


def test_held_out_rows_split_the_training_set():
    chosen, rest = held_out_rows(100, 10, seed=3)
    assert len(chosen) == 10 and len(rest) == 90
    np.testing.assert_array_equal(np.sort(np.concatenate([chosen, rest])), np.arange(100))
    np.testing.assert_array_equal(chosen, held_out_rows(100, 10, seed=3)[0])  # seeded
    assert not np.array_equal(chosen, held_out_rows(100, 10, seed=4)[0])
    assert len(held_out_rows(5, 10, seed=0)[0]) == 5
    with pytest.raises(ValueError, match="importance_examples must be >= 1, got 0"):
        held_out_rows(5, 0, seed=0)


def test_rewire_model_validates_scores_before_assigning():
    model = random_model(tiny_config(num_layers=2), seed=8)
    before = numpy_weights(model)
    heads = [np.arange(4.0), np.arange(4.0)]
    with pytest.raises(ValueError, match="layer 1 has 12 FFN neurons but its neuron scores have shape \\(11,\\)"):
        rewire_model(model, heads, [np.arange(12.0), np.arange(11.0)])
    with pytest.raises(ValueError, match="layer 0 has 4 heads but its head scores have shape \\(3,\\)"):
        rewire_model(model, [np.arange(3.0), np.arange(4.0)], [np.arange(12.0)] * 2)
    for name, value in numpy_weights(model).items():  # nothing half-rewired
        np.testing.assert_array_equal(value, before[name])


SENTENCES = ["the movie was wonderful and moving", "a dull plot, badly acted"]


def test_rewired_real_minilm_computes_the_same_function(minilm_path, graph_mode):
    from tokenizers import Tokenizer

    config = pretrained_config(minilm_path)
    model = NezhaForSequenceClassification(config, 2, output_hidden_states=True)
    load_pretrained(model.bert, minilm_path, log=None)
    rng = np.random.default_rng(0)
    model.classifier.weight.set_data(Tensor((rng.standard_normal((2, config.hidden_size)) * 0.5).astype(np.float32)))
    model.set_train(False)
    tokenizer = Tokenizer.from_file(str(minilm_path / "tokenizer.json"))
    encodings = [tokenizer.encode(text).ids for text in SENTENCES]
    length = max(len(ids) for ids in encodings)
    ids = np.zeros((2, length), np.int32)
    for row, encoding in enumerate(encodings):
        ids[row, : len(encoding)] = encoding
    inputs = (Tensor(ids), Tensor((ids != 0).astype(np.int32)), Tensor(np.zeros_like(ids)))
    labels = Tensor(np.array([1, 0], np.int32))

    logits, hidden, _ = model(*inputs)
    before = [logits.asnumpy()] + [state.asnumpy() for state in hidden]
    scorer = ImportanceScorer(model)
    importance = scorer([(*inputs, labels)])
    head_orders, neuron_orders = rewire_model(model, importance.heads, importance.neurons)
    assert any(not np.array_equal(order, np.arange(12)) for order in head_orders)
    assert any(not np.array_equal(order, np.arange(1536)) for order in neuron_orders)

    logits, hidden, _ = model(*inputs)
    after = [logits.asnumpy()] + [state.asnumpy() for state in hidden]
    for got, want in zip(after, before):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Scores follow their units: the rewired model's scores are the old ones in the new order, hence descending.
    rewired = scorer([(*inputs, labels)])
    for layer in range(config.num_layers):
        np.testing.assert_allclose(rewired.heads[layer], importance.heads[layer][head_orders[layer]],
                                   rtol=1e-3, atol=1e-6)
        np.testing.assert_allclose(rewired.neurons[layer], importance.neurons[layer][neuron_orders[layer]],
                                   rtol=1e-3, atol=1e-6)
        assert np.all(np.diff(importance.heads[layer][head_orders[layer]]) <= 0)


def test_prepare_rewires_without_changing_the_function(graph_mode):
    import json

    from ms_nlp_compress.compress.dynabert import prepare

    model = random_model(tiny_config(num_layers=2), seed=12)
    inputs = batch()
    before = model(*inputs)[0].asnumpy()
    original = numpy_weights(model)
    elastic = prepare(model, [(*inputs, Tensor(np.array([2, 0], np.int32)))])
    np.testing.assert_allclose(model(*inputs)[0].asnumpy(), before, rtol=1e-5, atol=1e-5)
    record = json.loads(json.dumps(elastic.rewiring_record()))["dynabert_rewiring"]
    assert record["importance_batches"] == 1
    for layer in range(2):
        order = np.array(record["head_orders"][layer])
        assert np.all(np.diff(elastic.importance.heads[layer][order]) <= 0)
        # Width 0.5 keeps new heads 0 and 1 = the two most important old heads (head size 3: 3 rows each).
        name = f"bert.encoder.layers.{layer}.attention.self_attention.query.weight"
        kept = elastic.subnetwork(0.5, 1.0)
        np.testing.assert_array_equal(
            dict(kept.parameters_and_names())[name].asnumpy()[:6],
            np.concatenate([original[name][3 * head: 3 * head + 3] for head in order[:2]]))
