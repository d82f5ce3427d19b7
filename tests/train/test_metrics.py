"""Metrics against hand-computed cases and independent formulas (scipy/sklearn cross-check only if installed)."""
import numpy as np
import pytest

from ms_nlp_compress.train.metrics import (accuracy, average_ranks, compute_metrics, f1_binary, matthews_corrcoef,
                                           pearson, spearman)

PREDS = np.array([1, 1, 0, 0, 1])
LABELS = np.array([1, 0, 0, 1, 1])  # tp 2, tn 1, fp 1, fn 1


def binary_mcc_twin(predictions, labels):
    tp = np.sum((predictions == 1) & (labels == 1))
    tn = np.sum((predictions == 0) & (labels == 0))
    fp = np.sum((predictions == 1) & (labels == 0))
    fn = np.sum((predictions == 0) & (labels == 1))
    return (tp * tn - fp * fn) / np.sqrt(float((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)))


def one_hot_mcc_twin(predictions, labels, classes):
    """Gorodkin's definition: the correlation of the two one-hot matrices, via covariances."""
    x = np.eye(classes)[predictions]
    y = np.eye(classes)[labels]
    x, y = x - x.mean(0), y - y.mean(0)
    return np.sum(x * y) / np.sqrt(np.sum(x * x) * np.sum(y * y))


def ranks_twin(values):
    """Rank by counting: 1 + (# smaller) + (# equal - 1) / 2."""
    values = np.asarray(values)
    return np.array([1 + np.sum(values < v) + (np.sum(values == v) - 1) / 2 for v in values])


def test_hand_computed_cases():
    assert accuracy(PREDS, LABELS) == pytest.approx(0.6)
    precision, recall = 2 / 3, 2 / 3
    assert f1_binary(PREDS, LABELS) == pytest.approx(2 * precision * recall / (precision + recall))
    assert matthews_corrcoef(PREDS, LABELS) == pytest.approx(1 / 6)
    assert spearman([1, 2, 2, 3], [10, 30, 20, 40]) == pytest.approx(np.corrcoef([1, 2.5, 2.5, 4], [1, 3, 2, 4])[0, 1])
    np.testing.assert_array_equal(average_ranks([3.0, 1.0, 3.0, 2.0, 3.0]), [4, 1, 4, 2, 4])


def test_random_cases_against_twins():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(0, 2, 50)
        predictions = np.where(rng.random(50) < 0.7, labels, 1 - labels)
        assert matthews_corrcoef(predictions, labels) == pytest.approx(binary_mcc_twin(predictions, labels))
        tp = np.sum((predictions == 1) & (labels == 1))
        assert f1_binary(predictions, labels) == pytest.approx(
            2 * tp / (np.sum(predictions == 1) + np.sum(labels == 1)))
        multi_labels, multi_predictions = rng.integers(0, 3, 60), rng.integers(0, 3, 60)
        assert matthews_corrcoef(multi_predictions, multi_labels) == pytest.approx(
            one_hot_mcc_twin(multi_predictions, multi_labels, 3))
        scores = rng.integers(0, 6, 40).astype(float)  # many ties
        gold = scores + rng.normal(0, 2, 40)
        assert pearson(scores, gold) == pytest.approx(np.corrcoef(scores, gold)[0, 1])
        np.testing.assert_allclose(average_ranks(scores), ranks_twin(scores))
        assert spearman(scores, gold) == pytest.approx(np.corrcoef(ranks_twin(scores), ranks_twin(gold))[0, 1])
    assert spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)  # monotone, not linear
    assert pearson([1, 2, 3, 4], [1, 8, 27, 64]) < 1.0


def test_degenerate_inputs_return_zero():
    labels = np.array([0, 1, 1, 0])
    constant = np.zeros(4, dtype=int)
    assert matthews_corrcoef(constant, labels) == 0.0
    assert matthews_corrcoef(labels, constant) == 0.0
    assert pearson(np.ones(4), [1.0, 2.0, 3.0, 4.0]) == 0.0
    assert spearman(np.ones(4), [1.0, 2.0, 3.0, 4.0]) == 0.0
    assert f1_binary(constant, constant) == 0.0  # no positive predicted nor present
    with pytest.raises(ValueError, match="predictions"):
        accuracy([1, 0], [1, 0, 1])
    with pytest.raises(ValueError, match="predictions"):
        pearson([], [])


def test_compute_metrics_per_task():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4], [0.0, 1.0]])  # argmax = PREDS
    mrpc = compute_metrics("MRPC", logits, LABELS)
    assert set(mrpc) == {"acc", "f1", "acc_and_f1"}
    assert mrpc["acc_and_f1"] == pytest.approx((0.6 + 2 / 3) / 2)
    assert set(compute_metrics("qqp", PREDS, LABELS)) == {"acc", "f1", "acc_and_f1"}
    assert compute_metrics("cola", PREDS, LABELS) == {"mcc": pytest.approx(1 / 6)}
    scores, gold = np.array([[0.5], [2.0], [1.0], [4.0]]), np.array([0.0, 2.5, 1.5, 5.0])
    for name in ("stsb", "STS-B", "sts_b"):
        sts = compute_metrics(name, scores, gold)
        assert set(sts) == {"pearson", "spearman", "corr"}
        assert sts["spearman"] == pytest.approx(1.0)
        assert sts["corr"] == pytest.approx((sts["pearson"] + 1.0) / 2)
    assert compute_metrics("sst-2", logits, LABELS) == {"acc": pytest.approx(0.6)}
    assert compute_metrics("mnli-mm", PREDS, LABELS) == {"acc": pytest.approx(0.6)}


def test_cross_check_with_scipy():
    import scipy.stats as stats  # installed with MindSpore (a dependency of it), never with our package
    rng = np.random.default_rng(1)
    scores, gold = rng.integers(0, 5, 30).astype(float), rng.normal(size=30)
    assert spearman(scores, gold) == pytest.approx(stats.spearmanr(scores, gold)[0])
    assert pearson(scores, gold) == pytest.approx(stats.pearsonr(scores, gold)[0])
    np.testing.assert_allclose(average_ranks(scores), stats.rankdata(scores))
