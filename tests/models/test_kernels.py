"""CPU kernel formulations (models/kernels.py) against float64 numpy twins, and kernels="cpu" vs "fused" models."""
import math

import numpy as np
import pytest

import mindspore as ms
from mindspore import ParameterTuple, Tensor, nn, ops

from ms_nlp_compress.config import NezhaConfig
from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.models import kernels
from ms_nlp_compress.models.kernels import (ExactGelu, LayerNorm, cpu_kernels_enabled, erf_rational,
                                            gelu_exact_cpu, only_cpu_kernels, use_cpu_kernel)
from ms_nlp_compress.models.nezha import Activation, NezhaForSequenceClassification, NezhaModel
from ms_nlp_compress.train.losses import SequenceClassificationLoss

_erf64 = np.vectorize(math.erf)

# Stated accuracy of the rational erf (float32 evaluation vs float64 math.erf); see kernels.py.
ERF_TOLERANCE = 5e-7
GELU_TOLERANCE = 2e-6  # absolute, on [-10, 10]: 0.5 * |x| * erf error


def gelu64(x):
    return 0.5 * x * (1.0 + _erf64(x / math.sqrt(2.0)))


def gelu64_grad(x):
    return 0.5 * (1.0 + _erf64(x / math.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)


def layer_norm64(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * gamma + beta


class _Fn(nn.Cell):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def construct(self, x):
        return self.fn(x)


def _grid():
    edges = np.array([0.0, -0.0, 1e-6, -1e-6, 1e-3, -1e-3, 4.0, -4.0, 5.657, -5.657, 30.0, -30.0])
    return np.concatenate([np.linspace(-10.0, 10.0, 20001), edges]).astype(np.float32)


def test_erf_rational_within_stated_error_of_float64_erf(execution_mode):
    x = _grid()
    ours = _Fn(erf_rational)(Tensor(x)).asnumpy().astype(np.float64)
    error = np.abs(ours - _erf64(x.astype(np.float64)))
    assert error.max() <= ERF_TOLERANCE, f"max |erf error| {error.max():.3g}"
    assert np.all(np.abs(ours) <= 1.0 + 2.5e-7)  # clamped: |erf| <= 1 up to float32 rounding
    assert ours[np.argmax(x == 0.0)] == 0.0


def test_gelu_exact_cpu_within_stated_error_of_float64_gelu(execution_mode):
    x = _grid()
    ours = _Fn(gelu_exact_cpu)(Tensor(x)).asnumpy().astype(np.float64)
    reference = gelu64(x.astype(np.float64))
    error = np.abs(ours - reference)
    assert error.max() <= GELU_TOLERANCE, f"max |GELU error| {error.max():.3g} at x={x[error.argmax()]}"
    # not the tanh approximation: that one is off by ~1e-3 around |x| = 2
    tanh_gelu = 0.5 * x * (1 + np.tanh(0.7978845608028654 * (x + 0.044715 * x ** 3)))
    assert np.abs(tanh_gelu - reference).max() > 1e-4


def test_exact_gelu_backward_matches_analytic_derivative(execution_mode):
    x = np.random.default_rng(0).normal(0.0, 3.0, (4, 257)).astype(np.float32)
    upstream = np.random.default_rng(1).normal(size=x.shape).astype(np.float32)
    grad = ops.GradOperation(sens_param=True)(ExactGelu())(Tensor(x), Tensor(upstream)).asnumpy()
    expected = upstream * gelu64_grad(x.astype(np.float64))
    np.testing.assert_allclose(grad, expected, atol=2e-6 * np.abs(upstream).max(), rtol=0)
    # and the analytic derivative is the derivative (central differences in float64)
    x64, step = x.astype(np.float64), 1e-6
    numeric = (gelu64(x64 + step) - gelu64(x64 - step)) / (2 * step)
    np.testing.assert_allclose(gelu64_grad(x64), numeric, atol=1e-7)


def _layer_norm_pair(width, eps, seed):
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.3 * rng.standard_normal(width)).astype(np.float32)
    beta = (0.2 * rng.standard_normal(width)).astype(np.float32)
    ours = LayerNorm((width,), epsilon=eps)
    theirs = nn.LayerNorm((width,), epsilon=eps)
    for cell in (ours, theirs):
        cell.gamma.set_data(Tensor(gamma))
        cell.beta.set_data(Tensor(beta))
    return ours, theirs, gamma, beta


class _WithParams(nn.Cell):
    """Gradients w.r.t. the input and every Parameter of `net`, for an upstream gradient `sens`."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.weights = ParameterTuple(net.trainable_params())
        self.grad = ops.GradOperation(get_all=True, get_by_list=True, sens_param=True)

    def construct(self, x, sens):
        return self.grad(self.net, self.weights)(x, sens)


@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_layer_norm_forward_and_gradients_match_numpy_and_nn_layer_norm(execution_mode, eps):
    ours, theirs, gamma, beta = _layer_norm_pair(16, eps, seed=3)
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((3, 5, 16)) * 2.0 + 0.5).astype(np.float32)
    x[0, 0] = 7.0  # a constant row: variance 0, only eps keeps it finite
    upstream = rng.standard_normal(x.shape).astype(np.float32)
    reference = layer_norm64(x.astype(np.float64), gamma, beta, eps)
    np.testing.assert_allclose(ours(Tensor(x)).asnumpy(), reference, atol=1e-5)
    np.testing.assert_allclose(ours(Tensor(x)).asnumpy(), theirs(Tensor(x)).asnumpy(), atol=1e-6)

    (dx,), (dgamma, dbeta) = _WithParams(ours)(Tensor(x), Tensor(upstream))
    (dx_nn,), (dgamma_nn, dbeta_nn) = _WithParams(theirs)(Tensor(x), Tensor(upstream))
    # float64 central differences of sum(upstream * LN(x)) on a few coordinates, plus the closed-form gamma/beta
    x64 = x.astype(np.float64)
    step = 1e-6
    for index in [(0, 1, 3), (1, 2, 0), (2, 4, 15), (1, 0, 7)]:
        plus, minus = x64.copy(), x64.copy()
        plus[index] += step
        minus[index] -= step
        numeric = ((layer_norm64(plus, gamma, beta, eps) - layer_norm64(minus, gamma, beta, eps)) * upstream).sum()
        assert abs(dx.asnumpy()[index] - numeric / (2 * step)) <= 1e-4 * max(1.0, abs(numeric / (2 * step)))
    xhat = (reference - beta) / gamma
    np.testing.assert_allclose(dgamma.asnumpy(), (upstream * xhat).sum((0, 1)), atol=1e-4)
    np.testing.assert_allclose(dbeta.asnumpy(), upstream.sum((0, 1)), atol=1e-5)
    np.testing.assert_allclose(dx.asnumpy(), dx_nn.asnumpy(), atol=1e-4, rtol=2e-5)  # constant row: |dx| ~ 1e6
    np.testing.assert_allclose(dgamma.asnumpy(), dgamma_nn.asnumpy(), atol=1e-4)
    np.testing.assert_allclose(dbeta.asnumpy(), dbeta_nn.asnumpy(), atol=1e-5)


def test_layer_norm_parameters_named_and_shaped_like_nn_layer_norm():
    class Holder(nn.Cell):
        def __init__(self, norm):
            super().__init__()
            self.layer_norm = norm

    def signature(cell):
        return [(p.name, tuple(p.shape), p.requires_grad, p.asnumpy().tolist()) for p in Holder(cell).get_parameters()]

    assert signature(LayerNorm((12,), epsilon=1e-12)) == signature(nn.LayerNorm((12,), epsilon=1e-12))
    assert [name for name, _ in Holder(LayerNorm((12,))).parameters_and_names()] == \
        ["layer_norm.gamma", "layer_norm.beta"]


def test_kernel_selector_and_config_validation():
    assert cpu_kernels_enabled("cpu") and not cpu_kernels_enabled("fused")
    assert cpu_kernels_enabled("auto") == (ms.get_context("device_target") == "CPU")
    with pytest.raises(ConfigError, match="model.kernels"):
        cpu_kernels_enabled("fast")
    with pytest.raises(ConfigError, match="model.kernels"):
        NezhaConfig(kernels="fast").validate()
    with only_cpu_kernels("layer_norm"):
        assert use_cpu_kernel("cpu", "layer_norm") and not use_cpu_kernel("cpu", "gelu")
    assert kernels._enabled_components == set(kernels.CPU_COMPONENTS)  # restored
    assert isinstance(Activation("gelu", "cpu").exact_gelu, ExactGelu)
    assert not Activation("gelu", "fused").cpu_gelu and not Activation("gelu_tanh", "cpu").cpu_gelu


def _tiny_config(kernels_kind):
    return NezhaConfig(vocab_size=50, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                       max_position_embeddings=16, position_embedding="absolute", max_relative_position=4,
                       hidden_dropout=0.0, attention_dropout=0.0, kernels=kernels_kind)


def _copy_weights(source, target):
    values = {name: param.asnumpy() for name, param in source.parameters_and_names()}
    target_names = [name for name, _ in target.parameters_and_names()]
    assert target_names == list(values)  # same names, same order: checkpoints are interchangeable
    for name, param in target.parameters_and_names():
        param.set_data(Tensor(values[name]))


def _inputs(batch=3, length=7):
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 50, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    return Tensor(ids), Tensor(mask), Tensor(np.zeros_like(ids))


def test_cpu_and_fused_models_agree_in_graph_mode(graph_mode):
    fused = NezhaModel(_tiny_config("fused"), output_hidden_states=True)
    cpu = NezhaModel(_tiny_config("cpu"), output_hidden_states=True)
    assert isinstance(cpu.encoder.layers[0].ffn.layer_norm, LayerNorm)
    assert isinstance(fused.encoder.layers[0].ffn.layer_norm, nn.LayerNorm)
    _copy_weights(fused, cpu)
    for model in (fused, cpu):
        model.set_train(False)
    # make the GELU inputs span a wide range, as in trained models
    ffn = fused.encoder.layers[0].ffn.intermediate.weight
    scaled = ffn.asnumpy() * 40.0
    fused.encoder.layers[0].ffn.intermediate.weight.set_data(Tensor(scaled))
    cpu.encoder.layers[0].ffn.intermediate.weight.set_data(Tensor(scaled))
    ids, mask, types = _inputs()
    out_fused, out_cpu = fused(ids, mask, types), cpu(ids, mask, types)
    np.testing.assert_allclose(out_cpu[0].asnumpy(), out_fused[0].asnumpy(), atol=1e-5)
    np.testing.assert_allclose(out_cpu[1].asnumpy(), out_fused[1].asnumpy(), atol=1e-5)
    for ours, theirs in zip(out_cpu[2], out_fused[2]):
        np.testing.assert_allclose(ours.asnumpy(), theirs.asnumpy(), atol=1e-5)


def test_cpu_and_fused_models_have_the_same_gradients(graph_mode):
    fused = NezhaForSequenceClassification(_tiny_config("fused"), num_labels=3)
    cpu = NezhaForSequenceClassification(_tiny_config("cpu"), num_labels=3)
    _copy_weights(fused, cpu)
    ids, mask, types = _inputs()
    labels = Tensor(np.array([0, 2, 1], np.int32))
    grads = []
    for model in (fused, cpu):
        model.set_train(True)
        loss_cell = SequenceClassificationLoss(model)
        grad_fn = ms.value_and_grad(loss_cell, None, ParameterTuple(model.trainable_params()))
        loss, gradients = grad_fn(ids, mask, types, labels)
        grads.append((float(loss.asnumpy()), [g.asnumpy() for g in gradients]))
    assert abs(grads[0][0] - grads[1][0]) <= 1e-6
    for name_param, theirs, ours in zip(fused.trainable_params(), grads[0][1], grads[1][1]):
        np.testing.assert_allclose(ours, theirs, atol=1e-5, err_msg=name_param.name)
