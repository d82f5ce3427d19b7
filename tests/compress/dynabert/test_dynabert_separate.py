"""`dynabert.graph`: in `separate` mode the engine's TrainStep compiles one gradient graph per sub-network and the
update it applies is one clipped step of the SUM of the sub-networks' gradients, each computed here on its own
(numpy sum); `single` mode (one graph over the sum) applies the same update; the config key is checked."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import ParameterTuple, nn

from dynabert_tiny import batch, random_model, tiny_config
from ms_nlp_compress.compress.dynabert.config import DynaBertConfig
from ms_nlp_compress.compress.dynabert.elastic import ElasticModel
from ms_nlp_compress.compress.dynabert.loss import DynaBertLoss, build_loss
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.train.step import TrainStep

WIDTHS, DEPTHS = (1.0, 0.5), (1.0, 0.5)
LEARNING_RATE, MAX_NORM = 0.1, 0.5


class Gradients(nn.Cell):
    """Compiled gradient of one sub-network's (loss, components) Distiller with respect to `weights`."""

    def __init__(self, loss_cell, weights):
        super().__init__(auto_prefix=False)
        self.grad_fn = ms.value_and_grad(loss_cell, None, ParameterTuple(weights), has_aux=True)

    def construct(self, *inputs):
        (loss, _), grads = self.grad_fn(*inputs)
        return loss, grads


def build(graph):
    config = tiny_config(num_layers=2, hidden_dropout=0.0, attention_dropout=0.0)  # no dropout: one function
    teacher = random_model(config, seed=30)
    student = random_model(config, seed=31)
    return student, DynaBertLoss(ElasticModel(student), teacher, WIDTHS, DEPTHS, 1.0, 0.5, graph=graph)


@pytest.mark.parametrize("graph", ["separate", "single"])
def test_one_update_is_a_clipped_step_of_the_summed_subnetwork_gradients(graph_mode, graph):
    student, loss = build(graph)
    weights = student.trainable_params()
    inputs = batch(seed=3, batch_size=3)
    # Reference: every sub-network's gradient in its own graph, summed in float64 by numpy.
    losses, summed = [], [np.zeros(param.shape, np.float64) for param in weights]
    for distiller in loss.distillers:
        value, grads = Gradients(distiller, weights)(*inputs)
        losses.append(float(value.asnumpy()))
        for total, grad in zip(summed, grads):
            total += grad.asnumpy()
    norm = np.sqrt(sum((grad ** 2).sum() for grad in summed))
    assert norm > MAX_NORM  # the clip is active, so a mean instead of the sum would give another update
    factor = MAX_NORM / (norm + 1e-6)
    before = [param.asnumpy().copy() for param in weights]

    step = TrainStep(loss, nn.SGD(weights, learning_rate=LEARNING_RATE), max_grad_norm=MAX_NORM)
    assert len(step.member_cells) == (4 if graph == "separate" else 0)  # one gradient graph per sub-network
    step.set_train(True)
    result = step(*inputs)
    assert result.applied
    np.testing.assert_allclose(result.loss, sum(losses), rtol=1e-5)
    np.testing.assert_allclose([result.components[name] for name in loss.component_names], losses, rtol=1e-5)
    np.testing.assert_allclose(result.grad_norm, norm, rtol=1e-5)
    for param, old, grad in zip(weights, before, summed):
        np.testing.assert_allclose(param.asnumpy(), old - LEARNING_RATE * factor * grad, rtol=1e-5, atol=1e-7,
                                   err_msg=param.name)


def test_graph_key_default_and_errors():
    assert DynaBertConfig().graph == "separate"
    with pytest.raises(ConfigError, match=r"dynabert.graph: must be one of .* got 'both'"):
        DynaBertConfig(graph="both").validate()
    with pytest.raises(ConfigError, match=r"x.yaml: dynabert.graph"):
        DynaBertConfig.from_dict({"graph": "one"}, "x.yaml")
    config = tiny_config(num_layers=2)
    student, teacher = random_model(config, seed=32), random_model(config, seed=33)
    section = DynaBertConfig(width_multipliers=[1.0, 0.5], graph="single")
    assert build_loss(ElasticModel(student), section, teacher).separate_members == ()
    section = DynaBertConfig(width_multipliers=[1.0, 0.5])
    loss = build_loss(ElasticModel(student), section, teacher)
    assert loss.separate_members == tuple(loss.distillers) and len(loss.separate_members) == 2
    with pytest.raises(ConfigError, match=r"dynabert.graph: must be one of"):
        DynaBertLoss(ElasticModel(student), teacher, WIDTHS, DEPTHS, graph="many")
    with pytest.raises(ConfigError, match=r"dynabert.stages: must be in order"):
        DynaBertConfig(stages=["width_depth", "width"]).validate()
