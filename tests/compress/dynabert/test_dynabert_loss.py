"""The same-batch gradient sum: the loss over all sub-networks has the gradient of the sum of the sub-networks'
separate gradients (numpy), and one TrainStep call applies one clipped update of that sum."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn

from dynabert_tiny import batch, numpy_weights, random_model, tiny_config
from ms_nlp_compress.compress.distill.losses import hidden_mse, soft_cross_entropy
from ms_nlp_compress.compress.dynabert.config import DynaBertConfig
from ms_nlp_compress.compress.dynabert.elastic import ElasticModel
from ms_nlp_compress.compress.dynabert.loss import DynaBertLoss, build_loss, stage2_teacher
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.train.step import TrainStep

WIDTHS, DEPTHS = (1.0, 0.5), (1.0, 0.5)


def no_dropout_config():
    # Dropout off: the separate and the summed computations must see the same function (the stateless dropout
    # counters would otherwise advance between them).
    # Two layers keep the five compiled gradient graphs of these tests small.
    return tiny_config(num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)


class Gradients(nn.Cell):
    """Compiled gradient of a (loss, components) cell's loss with respect to `weights`."""

    def __init__(self, loss_cell, weights):
        super().__init__(auto_prefix=False)
        self.grad_fn = ms.value_and_grad(loss_cell, None, ParameterTuple(weights), has_aux=True)

    def construct(self, *inputs):
        (loss, _), grads = self.grad_fn(*inputs)
        return loss, grads


def setup():
    teacher = random_model(no_dropout_config(), seed=20)
    student = random_model(no_dropout_config(), seed=21)
    elastic = ElasticModel(student)
    loss = DynaBertLoss(elastic, teacher, WIDTHS, DEPTHS, logits_weight=1.0, hidden_weight=0.5)
    return teacher, student, elastic, loss


def test_summed_gradient_is_the_sum_of_subnetwork_gradients_and_one_clipped_update(graph_mode):
    teacher, student, elastic, loss = setup()
    names = [name for name, _ in student.parameters_and_names()]
    assert [param.name for param in student.get_parameters()] == names  # nesting did not rename them
    assert loss.component_names == ("w1_d1", "w0.5_d1", "w1_d0.5", "w0.5_d0.5")
    weights = student.trainable_params()
    inputs = batch()
    # Each sub-network's gradient on its own (one compiled graph per Distiller), summed in float64.
    separate_losses, separate = [], [np.zeros(param.shape, np.float64) for param in weights]
    for distiller in loss.distillers:
        value, grads = Gradients(distiller, weights)(*inputs)
        separate_losses.append(float(value.asnumpy()))
        for total_grad, grad in zip(separate, grads):
            total_grad += grad.asnumpy()
    assert max(np.abs(grad).max() for grad in separate) > 1e-3
    # The loss cell's gradient: one graph over all sub-networks.
    total, summed = Gradients(loss, weights)(*inputs)
    np.testing.assert_allclose(float(total.asnumpy()), sum(separate_losses), rtol=1e-6)
    for name, got, want in zip(names, summed, separate):
        np.testing.assert_allclose(got.asnumpy(), want, rtol=1e-5, atol=1e-7, err_msg=name)

    # One TrainStep call: the global norm of the SUM, one clip, one SGD update.
    norm = np.sqrt(sum((grad ** 2).sum() for grad in separate))
    max_norm = 0.5
    assert norm > max_norm  # the clip is active
    factor = max_norm / (norm + 1e-6)
    before = {param.name: param.asnumpy().copy() for param in weights}
    teacher_before = numpy_weights(teacher)
    step = TrainStep(loss, nn.SGD(weights, learning_rate=0.1), max_grad_norm=max_norm)
    step.set_train(True)
    result = step(*inputs)
    assert result.applied
    np.testing.assert_allclose([result.components[name] for name in loss.component_names], separate_losses,
                               rtol=1e-5)
    np.testing.assert_allclose(result.loss, sum(separate_losses), rtol=1e-5)
    np.testing.assert_allclose(result.grad_norm, norm, rtol=1e-5)
    for param, grad in zip(weights, separate):
        np.testing.assert_allclose(param.asnumpy(), before[param.name] - 0.1 * factor * grad, rtol=1e-5, atol=1e-7,
                                   err_msg=param.name)
    for name, value in numpy_weights(teacher).items():  # the teacher is frozen
        np.testing.assert_array_equal(value, teacher_before[name])


def test_subnetwork_loss_is_dynabert_distillation(graph_mode):
    """One sub-network's term, rebuilt from its outputs and the teacher's: SCE + lambda2 * sum of hidden MSEs with
    student state j against teacher state floor(j / d)."""
    teacher, student, elastic, loss = setup()
    inputs = batch()
    teacher_logits, teacher_hidden, _ = teacher(*inputs)
    student_logits, student_hidden, _ = elastic.subnetwork(0.5, 0.5, hidden_states=True)(*inputs)
    expected = float(soft_cross_entropy(student_logits, teacher_logits, 1.0).asnumpy())
    for j, teacher_index in enumerate((0, 2)):  # d = 0.5 on 2 layers: one layer, matched with teacher layer 2
        expected += 0.5 * float(hidden_mse(student_hidden[j], teacher_hidden[teacher_index]).asnumpy())
    value, _ = loss.distillers[3](*inputs)
    np.testing.assert_allclose(float(value.asnumpy()), expected, rtol=1e-5)


def test_build_loss_from_config_and_stage2_teachers():
    student = ElasticModel(random_model(no_dropout_config(), seed=22))
    teacher_elastic = ElasticModel(random_model(no_dropout_config(), seed=23))
    stage1 = build_loss(student, DynaBertConfig(width_multipliers=[0.5, 1.0]), teacher_elastic.model)
    assert stage1.component_names == ("w1_d1", "w0.5_d1")
    assert stage1.distillers[0].hidden_weight == 0.1 and stage1.distillers[0].prediction_weight == 1.0
    config = DynaBertConfig(width_multipliers=[1.0, 0.5], depth_multipliers=[1.0, 0.5], stage="width_depth",
                            teacher="same_width")
    stage2 = build_loss(student, config, stage2_teacher(teacher_elastic, config))
    assert len(stage2.distillers) == 4 and stage2.distillers[0].hidden_weight == 1.0
    # same_width: the w0.5 students (both depths) learn from the teacher's w0.5 full-depth sub-network
    assert stage2.distillers[1].teacher.cell is teacher_elastic.subnetwork(0.5, 1.0, hidden_states=True)
    assert stage2.distillers[3].teacher.cell is stage2.distillers[1].teacher.cell
    full = stage2_teacher(teacher_elastic, DynaBertConfig(stage="width_depth", teacher="full_width"))
    assert full is teacher_elastic.subnetwork(1.0, 1.0, hidden_states=True)
    with pytest.raises(ConfigError, match="no sub-network to train"):
        DynaBertLoss(student, teacher_elastic.model, (), (1.0,))


def test_final_stage_is_every_subnetwork_on_the_labels(graph_mode):
    """Stage `final` (the reference's final fine-tuning): no teacher; each sub-network's loss is the cross-entropy
    of its logits with the labels (numpy log-softmax twin), and the stage's loss is their sum."""
    student = random_model(no_dropout_config(), seed=24)
    elastic = ElasticModel(student)
    config = DynaBertConfig(width_multipliers=[1.0, 0.5], depth_multipliers=[1.0, 0.5], stage="final")
    loss = build_loss(elastic, config, teacher=object())  # any teacher given is ignored in this stage
    assert loss.component_names == ("w1_d1", "w0.5_d1", "w1_d0.5", "w0.5_d0.5")
    assert config.loss_weights() == (0.0, 0.0)
    inputs = batch()
    labels = np.array([1, 0], np.int32)
    total, parts = loss(*inputs, Tensor(labels))
    expected = []
    for width, depth in ((1.0, 1.0), (0.5, 1.0), (1.0, 0.5), (0.5, 0.5)):
        logits = elastic.subnetwork(width, depth, hidden_states=True)(*inputs)[0].asnumpy().astype(np.float64)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        expected.append(-log_probs[np.arange(2), labels].mean())
    np.testing.assert_allclose([float(p.asnumpy()) for p in parts], expected, rtol=1e-5)
    np.testing.assert_allclose(float(total.asnumpy()), sum(expected), rtol=1e-5)
    with pytest.raises(ConfigError, match=r"dynabert.stages: must be in order"):
        DynaBertConfig(stages=["final", "width"]).validate()
