"""TrainStep's separate-graph mode (a loss cell with `separate_members`, e.g. DynaBERT's sub-networks) against
numpy: one compiled gradient graph per member on the same batch, the gradients SUMMED, then one unscale / clip /
update (and, with accumulation, the mean over micro-batches of those sums).

Two members share one Dense, as sub-networks share the full model's Parameters: `full` uses every output row, `head`
only the first row (a slice, like a narrower sub-network), so its gradient is zero outside that row.
"""
import numpy as np
import pytest

from mindspore import Tensor, nn, ops

from ms_nlp_compress.errors import ConfigError
from ms_nlp_compress.train.step import LossScaler, TrainStep

LR = 0.1
HEAD_WEIGHT = 0.5


class FullLoss(nn.Cell):
    def __init__(self, dense):
        super().__init__(auto_prefix=False)
        self.dense = dense

    def construct(self, x, y):
        error = self.dense(x) - y
        return (error * error).mean()


class HeadLoss(nn.Cell):
    """HEAD_WEIGHT * mean((x W[:1]^T + b[:1] - y[:, :1])^2): only the first output row."""

    def __init__(self, dense):
        super().__init__(auto_prefix=False)
        self.dense = dense

    def construct(self, x, y):
        out = ops.matmul(x, self.dense.weight[:1].T) + self.dense.bias[:1]
        error = out - y[:, :1]
        return HEAD_WEIGHT * (error * error).mean()


class TwoMembers(nn.Cell):
    def __init__(self, weight, bias, names=("full", "head")):
        super().__init__()
        self.dense = nn.Dense(weight.shape[1], weight.shape[0])
        self.dense.weight.set_data(Tensor(weight))
        self.dense.bias.set_data(Tensor(bias))
        self.members = nn.CellList([FullLoss(self.dense), HeadLoss(self.dense)], auto_prefix=False)
        self.component_names = names

    @property
    def separate_members(self):
        return tuple(self.members)

    def construct(self, x, y):
        return self.members[0](x, y) + self.members[1](x, y)


def numpy_member_grads(weight, bias, x, y):
    """(losses, summed weight grad, summed bias grad) of the two members, in closed form."""
    error = x @ weight.T + bias - y  # (B, O)
    scale = 2.0 / error.size
    grad_w, grad_b = scale * error.T @ x, scale * error.sum(0)
    head_error = error[:, :1]  # (B, 1)
    head_scale = HEAD_WEIGHT * 2.0 / head_error.size
    grad_w[:1] += head_scale * head_error.T @ x
    grad_b[:1] += head_scale * head_error.sum(0)
    losses = ((error ** 2).mean(), HEAD_WEIGHT * (head_error ** 2).mean())
    return losses, grad_w, grad_b


def setup(seed=0, batch=8):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((3, 4)).astype(np.float32)
    bias = rng.standard_normal(3).astype(np.float32)
    x = rng.standard_normal((batch, 4)).astype(np.float32)
    y = rng.standard_normal((batch, 3)).astype(np.float32)
    return weight, bias, x, y


def make_step(weight, bias, max_grad_norm=None, **kwargs):
    loss_cell = TwoMembers(weight, bias)
    optimizer = nn.SGD(loss_cell.dense.trainable_params(), learning_rate=LR)
    return loss_cell, TrainStep(loss_cell, optimizer, max_grad_norm=max_grad_norm, **kwargs)


def test_summed_member_gradients_give_one_update(execution_mode):
    weight, bias, x, y = setup()
    loss_cell, step = make_step(weight, bias, scaler=LossScaler("dynamic", 1024.0))
    assert len(step.member_cells) == 2
    result = step(Tensor(x), Tensor(y))
    (full, head), grad_w, grad_b = numpy_member_grads(weight, bias, x, y)
    np.testing.assert_allclose(loss_cell.dense.weight.asnumpy(), weight - LR * grad_w, atol=1e-6)
    np.testing.assert_allclose(loss_cell.dense.bias.asnumpy(), bias - LR * grad_b, atol=1e-6)
    assert result.applied and result.boundary
    assert result.components["full"] == pytest.approx(full, rel=1e-5)
    assert result.components["head"] == pytest.approx(head, rel=1e-5)
    assert result.loss == pytest.approx(full + head, rel=1e-5)
    assert result.grad_norm == pytest.approx(np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum()), rel=1e-5)


def test_clipping_applies_once_to_the_sum(graph_mode):
    weight, bias, x, y = setup(1)
    _, grad_w, grad_b = numpy_member_grads(weight, bias, x, y)
    norm = np.sqrt((grad_w ** 2).sum() + (grad_b ** 2).sum())
    max_norm = float(norm / 3)
    loss_cell, step = make_step(weight, bias, max_grad_norm=max_norm)
    step(Tensor(x), Tensor(y))
    factor = max_norm / (norm + 1e-6)
    np.testing.assert_allclose(loss_cell.dense.weight.asnumpy(), weight - LR * factor * grad_w, atol=1e-6)
    np.testing.assert_allclose(loss_cell.dense.bias.asnumpy(), bias - LR * factor * grad_b, atol=1e-6)


def test_accumulation_averages_the_member_sums_over_micro_batches(graph_mode):
    weight, bias, x, y = setup(2, batch=8)
    loss_cell, step = make_step(weight, bias, accumulation=2, max_grad_norm=None)
    first = step(Tensor(x[:4]), Tensor(y[:4]))
    assert not first.applied and not first.boundary
    np.testing.assert_array_equal(loss_cell.dense.weight.asnumpy(), weight)  # nothing applied mid-cycle
    second = step(Tensor(x[4:]), Tensor(y[4:]))
    assert second.applied and second.boundary
    _, grad_w1, grad_b1 = numpy_member_grads(weight, bias, x[:4], y[:4])
    _, grad_w2, grad_b2 = numpy_member_grads(weight, bias, x[4:], y[4:])
    np.testing.assert_allclose(loss_cell.dense.weight.asnumpy(), weight - LR * (grad_w1 + grad_w2) / 2, atol=1e-6)
    np.testing.assert_allclose(loss_cell.dense.bias.asnumpy(), bias - LR * (grad_b1 + grad_b2) / 2, atol=1e-6)


def test_one_name_per_member_is_required(graph_mode):
    weight, bias, _, _ = setup()
    loss_cell = TwoMembers(weight, bias, names=("only_one",))
    optimizer = nn.SGD(loss_cell.dense.trainable_params(), learning_rate=LR)
    with pytest.raises(ConfigError, match="1 component_names for 2 separate_members"):
        TrainStep(loss_cell, optimizer)


def test_each_gradient_graph_compiles_once_across_steps(graph_mode):
    # a tuple of gradient Tensors handed from Python to a compiled Cell is a graph CONSTANT unless marked mutable:
    # every step would compile the sum and the finish graphs again (a new compile-cache entry per call)
    weight, bias, x, y = setup(3, batch=8)
    _, step = make_step(weight, bias, max_grad_norm=1.0)
    for start in range(0, 8, 2):
        step(Tensor(x[start:start + 2]), Tensor(y[start:start + 2]))
    assert len(step.sum_gradients.compile_cache) == 1
    assert len(step.finish_cell.compile_cache) == 1
