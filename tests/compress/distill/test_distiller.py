"""The Distiller against a numpy computation from separately-run teacher and student outputs (graph mode), the frozen
teacher through training steps, and the `distill:` config checks that need both models."""
import dataclasses

import numpy as np
import pytest

import mindspore as ms
from mindspore import Tensor, nn

from ms_nlp_compress.compress.distill.config import DistillConfig
from ms_nlp_compress.compress.distill.distiller import Distiller, HiddenProjection, prepare
from ms_nlp_compress.compress.distill.mapping import uniform_mapping
from ms_nlp_compress.config import NezhaConfig, from_mapping
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models.nezha import NezhaForSequenceClassification

TEACHER = NezhaConfig(vocab_size=40, hidden_size=16, num_layers=4, num_heads=4, intermediate_size=32,
                      max_relative_position=4, hidden_dropout=0.2, attention_dropout=0.2)
STUDENT = NezhaConfig(vocab_size=40, hidden_size=8, num_layers=2, num_heads=4, intermediate_size=16,
                      max_relative_position=4, hidden_dropout=0.0, attention_dropout=0.0)


def batch(labels_kind="class", seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(5, 40, (3, 7)).astype(np.int32)
    mask = np.ones((3, 7), np.int32)
    mask[1, 5:] = 0  # padded rows: their key columns carry the -10000 bias the zeroing must remove
    mask[2, 3:] = 0
    input_ids[mask == 0] = 0
    types = np.zeros((3, 7), np.int32)
    types[0, 4:] = 1
    labels = (rng.integers(0, 3, 3).astype(np.int32) if labels_kind == "class"
              else rng.standard_normal(3).astype(np.float32))
    return [Tensor(a) for a in (input_ids, mask, types, labels)]


def models(num_labels=3, seed=0, teacher_config=TEACHER, student_config=STUDENT):
    ms.set_seed(seed)
    teacher = NezhaForSequenceClassification(teacher_config, num_labels, output_hidden_states=True,
                                             output_attentions=True)
    student = NezhaForSequenceClassification(student_config, num_labels, output_hidden_states=True,
                                             output_attentions=True)
    for model in (teacher, student):  # logits of a few units, so that the temperature visibly matters
        model.classifier.weight.set_data(model.classifier.weight.data * 100.0)
    return teacher, student


# ---------------------------------------------------------------------------------------------------------------
# numpy twin
# ---------------------------------------------------------------------------------------------------------------

def outputs(cell, inputs):
    """The model run on its own, in eval mode, in PyNative (a different execution path from the graph under test)."""
    cell.set_train(False)
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        logits, hidden, scores = cell(*inputs[:3])
    finally:
        ms.set_context(mode=mode)
    return (logits.asnumpy().astype(np.float64), [h.asnumpy().astype(np.float64) for h in hidden],
            [s.asnumpy().astype(np.float64) for s in scores])


def dense_twin(dense, x):
    return x @ dense.weight.asnumpy().astype(np.float64).T + dense.bias.asnumpy().astype(np.float64)


def mse(a, b):
    return float(np.mean((a - b) ** 2))


def zeroed(scores):
    return np.where(scores <= -100, 0.0, scores)


def log_softmax(z):
    shifted = z - z.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def twin_terms(teacher_out, student_out, projection, mapping, temperature, labels, regression=False,
               zero_masked=True):
    t_logits, t_hidden, t_scores = teacher_out
    s_logits, s_hidden, s_scores = student_out

    def project(x, position):
        if projection.kind == "shared":
            return dense_twin(projection.fit_dense, x)
        if projection.kind == "per_layer":
            return dense_twin(projection.fit_denses[position], x)
        return x

    pairs = mapping.hidden_pairs()
    terms = {}
    if projection is not None:
        terms["embedding"] = mse(project(s_hidden[pairs[0][0]], 0), t_hidden[pairs[0][1]])
        terms["hidden"] = sum(mse(project(s_hidden[s], k), t_hidden[t]) for k, (s, t) in enumerate(pairs) if k > 0)
    keep = zeroed if zero_masked else (lambda x: x)
    terms["attention"] = sum(mse(keep(s_scores[s]), keep(t_scores[t])) for s, t in mapping.attention_pairs())
    if regression:
        terms["prediction"] = mse(s_logits, t_logits)
        terms["hard_label"] = mse(s_logits.reshape(-1), labels.astype(np.float64))
    else:
        teacher_probs = np.exp(log_softmax(t_logits / temperature))
        terms["prediction"] = float(-(teacher_probs * log_softmax(s_logits / temperature)).sum(-1).mean())
        terms["hard_label"] = float(-log_softmax(s_logits)[np.arange(len(labels)), labels].mean())
    return terms


WEIGHTS = {"embedding": 0.7, "hidden": 1.3, "attention": 0.4, "prediction": 2.0, "hard_label": 0.5}


@pytest.mark.parametrize("projection_kind", ["shared", "per_layer"])
def test_loss_equals_numpy_twin_graph_mode(graph_mode, projection_kind):
    teacher, student = models()
    mapping = uniform_mapping(2, 4)  # student 1 <- teacher 2, student 2 <- teacher 4
    projection = HiddenProjection(projection_kind, 8, 16, len(mapping.hidden_pairs()))
    distiller = Distiller(teacher, student, mapping, projection, *WEIGHTS.values(), temperature=2.5)
    assert distiller.component_names == tuple(WEIGHTS)
    inputs = batch()
    distiller.set_train(True)  # the teacher must still run in eval mode (it has dropout 0.2)
    loss, components = distiller(*inputs)
    assert len(components) == 5

    teacher_out, student_out = outputs(teacher, inputs), outputs(student, inputs)
    terms = twin_terms(teacher_out, student_out, projection, mapping, 2.5, inputs[3].asnumpy())
    for name, value in zip(distiller.component_names, components):
        np.testing.assert_allclose(float(value.asnumpy()), terms[name], rtol=2e-5, atol=1e-6, err_msg=name)
    expected = sum(WEIGHTS[name] * terms[name] for name in WEIGHTS)
    np.testing.assert_allclose(float(loss.asnumpy()), expected, rtol=2e-5)

    # The pieces the twin checks are not vacuous: the scores contain masked entries (both sides carry the -10000
    # bias there, so without the zeroing their raw-score differences would still count: 10% or more of the term),
    # the temperature changes the prediction term.
    assert (teacher_out[2][0] <= -100).any() and (student_out[2][0] <= -100).any()
    unzeroed = twin_terms(teacher_out, student_out, projection, mapping, 2.5, inputs[3].asnumpy(), zero_masked=False)
    assert abs(unzeroed["attention"] - terms["attention"]) > 0.1 * terms["attention"]
    at_one = twin_terms(teacher_out, student_out, projection, mapping, 1.0, inputs[3].asnumpy())
    assert abs(at_one["prediction"] - terms["prediction"]) > 1e-3
    # Embedding output (16 wide) vs the 8-wide student: only through the projection can they be compared at all.
    assert student_out[1][0].shape[-1] == 8 and teacher_out[1][0].shape[-1] == 16


def test_regression_terms_use_teacher_output_and_label(graph_mode):
    teacher, student = models(num_labels=1, seed=3)
    mapping = uniform_mapping(2, 4)
    distiller = Distiller(teacher, student, mapping, None, embedding_weight=0.0, hidden_weight=0.0,
                          attention_weight=0.0, prediction_weight=1.0, hard_label_weight=0.25, regression=True)
    assert distiller.component_names == ("prediction", "hard_label")
    inputs = batch("regression")
    loss, (prediction, hard_label) = distiller(*inputs)
    terms = twin_terms(outputs(teacher, inputs), outputs(student, inputs), None, mapping, 1.0,
                       inputs[3].asnumpy(), regression=True)
    np.testing.assert_allclose(float(prediction.asnumpy()), terms["prediction"], rtol=2e-5)
    np.testing.assert_allclose(float(hard_label.asnumpy()), terms["hard_label"], rtol=2e-5)
    np.testing.assert_allclose(float(loss.asnumpy()), terms["prediction"] + 0.25 * terms["hard_label"], rtol=2e-5)


def test_equal_width_projection_none_and_intermediate_only(graph_mode):
    """TernaryBERT's shape: same depth and width, identity mapping, no projection, intermediate terms only."""
    student_config = dataclasses.replace(TEACHER, hidden_dropout=0.0, attention_dropout=0.0)
    teacher, student = models(teacher_config=TEACHER, student_config=student_config, seed=5)
    config = DistillConfig(student=None, student_model=student_config, projection="none").intermediate_only()
    distiller = prepare(teacher, student, config, TEACHER, student_config)
    assert distiller.component_names == ("embedding", "hidden", "attention")
    assert distiller.mapping.teacher_layers == (0, 1, 2, 3, 4)
    inputs = batch(seed=2)
    _, components = distiller(*inputs[:3])  # no labels needed without the hard-label term
    terms = twin_terms(outputs(teacher, inputs), outputs(student, inputs), distiller.projection,
                       distiller.mapping, 1.0, inputs[3].asnumpy())
    for name, value in zip(distiller.component_names, components):
        np.testing.assert_allclose(float(value.asnumpy()), terms[name], rtol=2e-5, atol=1e-6, err_msg=name)


# ---------------------------------------------------------------------------------------------------------------
# the frozen teacher
# ---------------------------------------------------------------------------------------------------------------

class _Loss(nn.Cell):
    """Scalar view of the distiller for a plain value_and_grad loop (components as aux)."""

    def __init__(self, distiller):
        super().__init__(auto_prefix=False)
        self.distiller = distiller

    def construct(self, *inputs):
        return self.distiller(*inputs)


def test_teacher_bit_identical_after_training_and_not_trainable(graph_mode):
    teacher, student = models(seed=7)
    config = DistillConfig(student=None, student_model=STUDENT, hard_label_weight=0.5)
    distiller = prepare(teacher, student, config, TEACHER, STUDENT)
    teacher_before = {name: p.asnumpy().copy() for name, p in teacher.parameters_and_names()}
    student_before = {name: p.asnumpy().copy() for name, p in student.parameters_and_names()}
    projection_before = distiller.projection.fit_dense.weight.asnumpy().copy()

    trainable = distiller.trainable_params()
    teacher_ids = {id(p) for p in teacher.get_parameters()}
    assert not teacher_ids & {id(p) for p in trainable}
    expected = {id(p) for cell in distiller.trainable_cells() for p in cell.trainable_params()}
    assert {id(p) for p in trainable} == expected
    assert id(distiller.projection.fit_dense.weight) in expected

    optimizer = nn.Adam(trainable, learning_rate=1e-2)
    grad_fn = ms.value_and_grad(_Loss(distiller), None, optimizer.parameters, has_aux=True)

    @ms.jit
    def train_step(*inputs):
        (loss, _), grads = grad_fn(*inputs)
        optimizer(grads)
        return loss

    distiller.set_train(True)
    losses = [float(train_step(*batch(seed=step)).asnumpy()) for step in range(4)]
    assert all(np.isfinite(losses))
    for name, param in teacher.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), teacher_before[name], err_msg=name)
    changed = [name for name, p in student.parameters_and_names()
               if p.requires_grad and not np.array_equal(p.asnumpy(), student_before[name])]
    assert len(changed) == len([p for p in student.get_parameters() if p.requires_grad])
    assert not np.array_equal(distiller.projection.fit_dense.weight.asnumpy(), projection_before)


def test_teacher_outputs_unchanged_between_calls_in_training_mode(graph_mode):
    heavy_dropout = dataclasses.replace(TEACHER, hidden_dropout=0.5, attention_dropout=0.5)
    teacher, student = models(teacher_config=heavy_dropout, seed=11)
    reference = NezhaForSequenceClassification(heavy_dropout, 3, output_hidden_states=True, output_attentions=True)
    reference.set_train(True)
    for (_, mine), (_, theirs) in zip(teacher.parameters_and_names(), reference.parameters_and_names()):
        theirs.set_data(mine.data.copy())
    distiller = Distiller(teacher, student, uniform_mapping(2, 4), HiddenProjection("shared", 8, 16, 3))
    distiller.set_train(True)
    inputs = batch()[:3]
    first = distiller.teacher(*inputs)
    second = distiller.teacher(*inputs)
    for a, b in zip([first[0], *first[1], *first[2]], [second[0], *second[1], *second[2]]):
        np.testing.assert_array_equal(a.asnumpy(), b.asnumpy())
    # The same weights in a non-frozen cell in training mode DO change between calls: dropout was really avoided.
    # (The reference runs in PyNative: two more graph compiles would only slow the test down.)
    ms.set_context(mode=ms.PYNATIVE_MODE)
    assert not np.array_equal(reference(*inputs)[0].asnumpy(), reference(*inputs)[0].asnumpy())
    # And the frozen teacher equals the eval-mode teacher.
    reference.set_train(False)
    np.testing.assert_allclose(first[0].asnumpy(), reference(*inputs)[0].asnumpy(), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# config errors naming the key and both sides
# ---------------------------------------------------------------------------------------------------------------

def test_config_errors_name_key_and_both_sides():
    config = DistillConfig(student=None, student_model=STUDENT)
    with pytest.raises(ConfigError, match=r"distill\.layer_mapping: .*student layer 2 is 5, outside the teacher's "
                                          r"layers 1\.\.4.*student 2 layers, teacher 4 layers"):
        dataclasses.replace(config, layer_mapping=[2, 5]).check_models(TEACHER, STUDENT)
    with pytest.raises(ConfigError, match=r"distill\.layer_mapping: .*divisible.*student 3 layers, teacher 4"):
        config.check_models(TEACHER, dataclasses.replace(STUDENT, num_layers=3))
    fewer_heads = dataclasses.replace(STUDENT, num_heads=2)
    with pytest.raises(ConfigError, match=r"distill\.attention_weight: student layer 1 has 2 heads but the teacher "
                                          r"layer it maps to \(2\) has 4"):
        config.check_models(TEACHER, fewer_heads)
    dataclasses.replace(config, attention_weight=0.0).check_models(TEACHER, fewer_heads)  # fine without the term
    with pytest.raises(ConfigError, match=r"distill\.student: teacher vocab_size is 40 but student vocab_size is 41"):
        config.check_models(TEACHER, dataclasses.replace(STUDENT, vocab_size=41))
    with pytest.raises(ConfigError, match=r"distill\.projection: none needs equal widths, but teacher hidden_size "
                                          r"is 16 and student hidden_size is 8"):
        dataclasses.replace(config, projection="none").check_models(TEACHER, STUDENT)


@pytest.mark.parametrize("values,message", [
    ({"projection": "diagonal"}, r"distill\.projection: must be one of"),
    ({"temperature": 0}, r"distill\.temperature: must be > 0"),
    ({"hidden_weight": -1}, r"distill\.hidden_weight: must be >= 0"),
    ({"student": "tinybert5"}, r"distill\.student: unknown preset 'tinybert5'"),
    ({"student_init": "pretrained"}, r"distill\.student_init_path: is required"),
    ({"layer_mapping": [0, 3]}, r"distill\.layer_mapping: teacher layers are numbered 1\.\.T"),
    ({"student_init_layers": [1, 2]}, r"distill\.student_init_layers: only used with student_init: teacher_layers"),
    ({"embedding_weight": 0, "hidden_weight": 0, "attention_weight": 0, "prediction_weight": 0},
     "every loss weight is 0"),
])
def test_config_section_errors_name_the_key(values, message):
    with pytest.raises(ConfigError, match=message):
        from_mapping(DistillConfig, values, "x.yaml", "distill").validate("distill")


def test_config_unknown_key_names_file_and_key():
    with pytest.raises(ConfigError, match=r"x\.yaml: unknown key\(s\) distill\.temprature"):
        from_mapping(DistillConfig, {"temprature": 2.0}, "x.yaml", "distill")
    parsed = from_mapping(DistillConfig, {"student": None, "student_model": {"num_layers": 2, "hidden_size": 8,
                                                                             "num_heads": 2}}, "x.yaml", "distill")
    assert isinstance(parsed.student_model, NezhaConfig) and parsed.student_model.hidden_size == 8
    parsed.validate()


def test_engine_train_step_logs_named_components_and_keeps_teacher(graph_mode):
    """Through the engine's compiled TrainStep: components come back by name, loss = weighted sum of them, only
    student and projection move."""
    from ms_nlp_compress.train.step import TrainStep

    teacher, student = models(seed=13)
    config = DistillConfig(student=None, student_model=STUDENT, projection="per_layer", prediction_weight=0.5,
                           temperature=2.0)
    distiller = prepare(teacher, student, config, TEACHER, STUDENT)
    teacher_before = {name: p.asnumpy().copy() for name, p in teacher.parameters_and_names()}
    step = TrainStep(distiller, nn.Adam(distiller.trainable_params(), learning_rate=1e-2), max_grad_norm=1.0)
    step.set_train(True)
    results = [step(*batch(seed=seed)[:3]) for seed in range(3)]
    for result in results:
        assert list(result.components) == ["embedding", "hidden", "attention", "prediction"]
        weighted = sum(w * result.components[name] for name, w in
                       (("embedding", 1.0), ("hidden", 1.0), ("attention", 1.0), ("prediction", 0.5)))
        np.testing.assert_allclose(result.loss, weighted, rtol=1e-5)
        assert result.applied
    for name, param in teacher.parameters_and_names():
        np.testing.assert_array_equal(param.asnumpy(), teacher_before[name], err_msg=name)
