"""Distillation losses against numpy twins (float64) on random and edge-case inputs, and inside a graph."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor, nn

from ms_nlp_compress.compress.distill import losses
from ms_nlp_compress.compress.quant.primitives import validate_finite


def twin_soft_cross_entropy(student, teacher, temperature):
    def log_softmax(z):
        shifted = z - z.max(axis=-1, keepdims=True)
        return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))

    s, t = student.astype(np.float64) / temperature, teacher.astype(np.float64) / temperature
    return float(-(np.exp(log_softmax(t)) * log_softmax(s)).sum(axis=-1).mean())


def twin_mse(a, b):
    return float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def twin_attention_mse(student, teacher):
    s, t = student.astype(np.float64), teacher.astype(np.float64)
    return twin_mse(np.where(s <= -100, 0.0, s), np.where(t <= -100, 0.0, t))


def rng_array(shape, seed, scale=1.0):
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("shape,scale", [((4, 3), 1.0), ((1, 1), 1.0), ((2, 5), 1e30), ((3, 2), 0.0)])
def test_soft_cross_entropy_matches_twin(temperature, shape, scale):
    student, teacher = rng_array(shape, 0, scale), rng_array(shape, 1, scale)
    actual = float(losses.soft_cross_entropy(Tensor(student), Tensor(teacher), temperature).asnumpy())
    expected = twin_soft_cross_entropy(student, teacher, temperature)
    assert np.isfinite(actual)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_soft_cross_entropy_sums_over_classes():
    """Equal zero logits over C classes give log(C): summed over classes, not averaged (project decision)."""
    zeros = Tensor(np.zeros((2, 4), np.float32))
    np.testing.assert_allclose(float(losses.soft_cross_entropy(zeros, zeros).asnumpy()), np.log(4), rtol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        losses.soft_cross_entropy(zeros, zeros, 0.0)
    with pytest.raises(ValueError, match="student_logits has shape"):
        losses.soft_cross_entropy(zeros, Tensor(np.zeros((2, 3), np.float32)))


@pytest.mark.parametrize("shape,scale", [((4,), 1.0), ((1,), 1.0), ((3, 5), 1e18), ((2, 3, 4), 0.0)])
def test_logits_mse_matches_twin(shape, scale):
    student, teacher = rng_array(shape, 2, scale), rng_array(shape, 3, scale)
    actual = float(losses.logits_mse(Tensor(student), Tensor(teacher)).asnumpy())
    np.testing.assert_allclose(actual, twin_mse(student, teacher), rtol=1e-5)


def test_hidden_mse_with_and_without_projection():
    student, teacher = rng_array((2, 3, 4), 4), rng_array((2, 3, 6), 5)
    projection = nn.Dense(4, 6)
    weight, bias = projection.weight.asnumpy(), projection.bias.asnumpy()  # (6, 4), (6,)
    actual = float(losses.hidden_mse(Tensor(student), Tensor(teacher), projection).asnumpy())
    np.testing.assert_allclose(actual, twin_mse(student @ weight.T + bias, teacher), rtol=1e-5)
    same_width = rng_array((2, 3, 4), 6)
    actual = float(losses.hidden_mse(Tensor(student), Tensor(same_width)).asnumpy())
    np.testing.assert_allclose(actual, twin_mse(student, same_width), rtol=1e-6)
    with pytest.raises(ValueError, match="projected student_hidden has shape"):
        losses.hidden_mse(Tensor(student), Tensor(teacher))


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 4, 4)])
def test_attention_mse_zeroes_masked_scores(shape):
    student, teacher = rng_array(shape, 7, 3.0), rng_array(shape, 8, 3.0)
    student[..., -1] = -10000.0  # a masked key column: the additive mask dominates both
    teacher[..., -1] = -10003.5
    student.reshape(-1)[0] = -100.0  # exactly at the threshold: zeroed
    teacher.reshape(-1)[0] = -99.9  # just above: kept
    actual = float(losses.attention_mse(Tensor(student), Tensor(teacher)).asnumpy())
    np.testing.assert_allclose(actual, twin_attention_mse(student, teacher), rtol=1e-5)


def test_attention_mse_edge_cases():
    zeros = Tensor(np.zeros((1, 2, 3, 3), np.float32))
    assert float(losses.attention_mse(zeros, zeros).asnumpy()) == 0.0
    all_masked = Tensor(np.full((1, 2, 3, 3), -1e30, np.float32))
    assert float(losses.attention_mse(all_masked, zeros).asnumpy()) == 0.0
    huge = rng_array((1, 1, 2, 2), 9, 1e18)
    np.testing.assert_allclose(float(losses.attention_mse(Tensor(huge), Tensor(np.zeros_like(huge))).asnumpy()),
                               twin_attention_mse(huge, np.zeros_like(huge)), rtol=1e-5)


class DistillationLoss(nn.Cell):
    def __init__(self):
        super().__init__()
        self.projection = nn.Dense(4, 6)

    def construct(self, student_logits, teacher_logits, student_hidden, teacher_hidden, student_scores,
                  teacher_scores):
        return (losses.soft_cross_entropy(student_logits, teacher_logits, 2.0),
                losses.logits_mse(student_logits, teacher_logits),
                losses.hidden_mse(student_hidden, teacher_hidden, self.projection),
                losses.attention_mse(student_scores, teacher_scores))


def test_losses_in_graph_mode_match_pynative():
    inputs = [Tensor(rng_array(shape, seed)) for seed, shape in
              enumerate([(3, 4), (3, 4), (2, 3, 4), (2, 3, 6), (2, 2, 3, 3), (2, 2, 3, 3)])]
    network = DistillationLoss()
    eager = [float(value.asnumpy()) for value in network(*inputs)]
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        graph = [float(value.asnumpy()) for value in network(*inputs)]
    finally:
        ms.set_context(mode=ms.PYNATIVE_MODE)
    np.testing.assert_allclose(graph, eager, rtol=1e-6)


def test_nan_logits_rejected_host_side():
    logits = rng_array((2, 3), 10)
    logits[1, 0] = np.nan
    with pytest.raises(ValueError, match="teacher_logits contains 1 NaN"):
        validate_finite("teacher_logits", logits)
