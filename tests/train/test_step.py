"""The compiled train step against numpy: loss-scale overflow skip, clipping, accumulation equivalence.

SGD (not Adam) is the optimizer here because Adam's first update is nearly invariant to gradient scale, which would
hide a clipping or averaging error.
"""
import numpy as np
import pytest

from mindspore import Tensor, nn

from ms_nlp_compress.train.step import LossScaler, TrainStep, resolve_loss_scale_mode

LR = 0.1


class LinearRegressionLoss(nn.Cell):
    """mean((x W^T + b - y)^2): gradients have a closed form for the numpy twin."""

    def __init__(self, weight, bias):
        super().__init__()
        self.dense = nn.Dense(weight.shape[1], weight.shape[0])
        self.dense.weight.set_data(Tensor(weight))
        self.dense.bias.set_data(Tensor(bias))

    def construct(self, x, y):
        error = self.dense(x) - y
        return (error * error).mean()


def numpy_grads(weight, bias, x, y):
    error = x @ weight.T + bias - y  # (B, O)
    scale = 2.0 / error.size
    return scale * error.T @ x, scale * error.sum(0)


def setup(seed=0, batch=8):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((2, 3)).astype(np.float32)
    bias = rng.standard_normal(2).astype(np.float32)
    x = rng.standard_normal((batch, 3)).astype(np.float32)
    y = rng.standard_normal((batch, 2)).astype(np.float32)
    return weight, bias, x, y


def make_step(weight, bias, scaler=None, accumulation=1, max_grad_norm=None):
    loss_cell = LinearRegressionLoss(weight, bias)
    optimizer = nn.SGD(loss_cell.trainable_params(), learning_rate=LR)
    return loss_cell, TrainStep(loss_cell, optimizer, scaler, accumulation, max_grad_norm)


def test_plain_step_matches_numpy_sgd(execution_mode):
    weight, bias, x, y = setup()
    loss_cell, step = make_step(weight, bias, LossScaler("dynamic", 1024.0))
    result = step(Tensor(x), Tensor(y))
    grad_w, grad_b = numpy_grads(weight, bias, x, y)
    np.testing.assert_allclose(loss_cell.dense.weight.asnumpy(), weight - LR * grad_w, atol=1e-6)
    np.testing.assert_allclose(loss_cell.dense.bias.asnumpy(), bias - LR * grad_b, atol=1e-6)
    assert result.applied and result.grad_norm == pytest.approx(
        np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum()), rel=1e-5)
    assert result.loss == pytest.approx(((x @ weight.T + bias - y) ** 2).mean(), rel=1e-5)


def test_clipping_scales_to_the_global_norm(graph_mode):
    weight, bias, x, y = setup(1)
    grad_w, grad_b = numpy_grads(weight, bias, x, y)
    norm = np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum())
    max_norm = norm / 4
    loss_cell, step = make_step(weight, bias, max_grad_norm=float(max_norm))
    step(Tensor(x), Tensor(y))
    factor = max_norm / (norm + 1e-6)
    np.testing.assert_allclose(loss_cell.dense.weight.asnumpy(), weight - LR * factor * grad_w, atol=1e-6)
    np.testing.assert_allclose(loss_cell.dense.bias.asnumpy(), bias - LR * factor * grad_b, atol=1e-6)


def test_overflow_skips_the_update_and_lowers_the_scale(graph_mode):
    weight, bias, x, y = setup(2)
    scaler = LossScaler("dynamic", value=3.0e38, factor=2.0, window=2)
    loss_cell, step = make_step(weight, bias, scaler)
    result = step(Tensor(x), Tensor(y))  # loss * 3e38 overflows float32
    assert not result.applied and result.boundary
    np.testing.assert_array_equal(loss_cell.dense.weight.asnumpy(), weight)  # untouched
    assert scaler.scale == pytest.approx(1.5e38) and scaler.skipped_steps == 1
    while not step(Tensor(x), Tensor(y)).applied:  # halves until finite, then trains
        pass
    assert scaler.scale < 1.5e38 and not np.array_equal(loss_cell.dense.weight.asnumpy(), weight)
    assert scaler.good_steps == 1
    settled = scaler.scale
    step(Tensor(x), Tensor(y))  # the second clean step completes the window of 2: the scale doubles
    assert scaler.scale == 2 * settled and scaler.good_steps == 0


def test_dynamic_scale_grows_after_a_clean_window():
    scaler = LossScaler("dynamic", value=8.0, factor=2.0, window=3)
    for _ in range(3):
        scaler.update(True)
    assert scaler.scale == 16.0 and scaler.good_steps == 0
    scaler.update(False)
    assert scaler.scale == 8.0
    static = LossScaler("static", value=8.0)
    static.update(False)
    assert static.scale == 8.0 and static.skipped_steps == 1
    assert resolve_loss_scale_mode("auto", "fp32") == "none" and resolve_loss_scale_mode("auto", "O2") == "dynamic"
    assert resolve_loss_scale_mode("auto", "O2", "bfloat16") == "none"


def test_non_finite_without_scaling_is_an_error(graph_mode):
    weight, bias, x, y = setup(3)
    x[0, 0] = np.inf
    loss_cell, step = make_step(weight, bias, LossScaler("none"))
    with pytest.raises(FloatingPointError, match="diverged"):
        step(Tensor(x), Tensor(y))
    np.testing.assert_array_equal(loss_cell.dense.weight.asnumpy(), weight)


def test_accumulation_equals_one_big_batch(graph_mode):
    weight, bias, x, y = setup(4, batch=8)
    big_cell, big_step = make_step(weight, bias, max_grad_norm=0.5)
    acc_cell, acc_step = make_step(weight, bias, accumulation=2, max_grad_norm=0.5)
    for _ in range(3):
        big_step(Tensor(x), Tensor(y))
        first = acc_step(Tensor(x[:4]), Tensor(y[:4]))
        second = acc_step(Tensor(x[4:]), Tensor(y[4:]))
        assert not first.boundary and second.boundary and second.applied
    np.testing.assert_allclose(acc_cell.dense.weight.asnumpy(), big_cell.dense.weight.asnumpy(), atol=1e-6)
    np.testing.assert_allclose(acc_cell.dense.bias.asnumpy(), big_cell.dense.bias.asnumpy(), atol=1e-6)
    buffers = [b.asnumpy() for b in acc_step.accumulator.buffers]
    assert all(not b.any() for b in buffers)  # reset after each update
