"""GLUE-style evaluation metrics on numpy arrays (no scipy / sklearn in the package).

Degenerate inputs return 0.0 instead of NaN: a constant prediction vector has an undefined Matthews or Pearson
correlation (0/0), and an early checkpoint that predicts one class for everything is common. Reporting 0.0 ("no
better than chance") keeps model selection (`max` over metrics) and JSON logs well defined. sklearn makes the same
choice for MCC; scipy would return NaN for Pearson/Spearman.
"""
from typing import Dict

import numpy as np


def _check_pair(predictions, labels):
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.shape != labels.shape:
        raise ValueError(f"predictions: shape {predictions.shape} does not match labels shape {labels.shape}")
    if predictions.size == 0:
        raise ValueError("predictions: empty; nothing to evaluate")
    return predictions, labels


def accuracy(predictions, labels) -> float:
    """Fraction of exact matches."""
    predictions, labels = _check_pair(predictions, labels)
    return float(np.mean(predictions == labels))


def f1_binary(predictions, labels, positive: int = 1) -> float:
    """F1 of the positive class (1 for MRPC/QQP: "is a paraphrase"); 0.0 when there is no positive anywhere."""
    predictions, labels = _check_pair(predictions, labels)
    predicted, actual = predictions == positive, labels == positive
    true_pos = np.sum(predicted & actual)
    wrong = np.sum(predicted != actual)  # false positives + false negatives
    denominator = 2 * true_pos + wrong
    return float(2 * true_pos / denominator) if denominator > 0 else 0.0


def matthews_corrcoef(predictions, labels) -> float:
    """Matthews correlation (CoLA), multi-class form of Gorodkin (2004); binary reduces to the usual formula.

    0.0 when either side is constant (the correlation is 0/0).
    """
    predictions, labels = _check_pair(predictions, labels)
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    n = labels.size
    label_idx, pred_idx = encoded[:n], encoded[n:]
    confusion = np.zeros((classes.size, classes.size), dtype=np.float64)  # (true, predicted)
    np.add.at(confusion, (label_idx, pred_idx), 1.0)
    true_counts, pred_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    correct = np.trace(confusion)
    covariance = correct * n - true_counts @ pred_counts
    variance_pred = n * n - pred_counts @ pred_counts
    variance_true = n * n - true_counts @ true_counts
    if variance_pred <= 0 or variance_true <= 0:
        return 0.0
    return float(covariance / np.sqrt(variance_pred * variance_true))


def pearson(predictions, labels) -> float:
    """Pearson correlation coefficient (STS-B); 0.0 when either side is constant."""
    predictions, labels = _check_pair(predictions, labels)
    x = predictions.astype(np.float64).ravel()
    y = labels.astype(np.float64).ravel()
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt(np.dot(x, x) * np.dot(y, y))
    return float(np.dot(x, y) / norm) if norm > 0 else 0.0


def average_ranks(values) -> np.ndarray:
    """1-based ranks; tied values share the mean of the ranks they span (as scipy.stats.rankdata 'average')."""
    values = np.asarray(values).ravel()
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    # The k-th distinct value (sorted) spans ranks end - count + 1 .. end, where end = cumsum(counts)[k].
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2.0)[inverse.ravel()]


def spearman(predictions, labels) -> float:
    """Spearman rank correlation: Pearson on average ranks (ties handled); 0.0 when either side is constant."""
    predictions, labels = _check_pair(predictions, labels)
    return pearson(average_ranks(predictions), average_ranks(labels))


_PAIR_F1_TASKS = ("mrpc", "qqp")
_REGRESSION_TASKS = ("stsb",)


def compute_metrics(task_metric_name: str, predictions, labels) -> Dict[str, float]:
    """The GLUE metric set of a task, as a dict of floats.

    mrpc, qqp -> acc, f1, acc_and_f1 (their mean); cola -> mcc; sts-b / stsb -> pearson, spearman, corr (their
    mean); any other name -> acc. Names are case-insensitive and ignore '-' and '_' ("STS-B" == "stsb").
    For classification tasks, 2-D predictions are logits (N, C) and are reduced with argmax over the last axis;
    for STS-B, (N, 1) scores are flattened.
    """
    task = str(task_metric_name).lower().replace("-", "").replace("_", "")
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if task in _REGRESSION_TASKS:
        if predictions.ndim == 2 and predictions.shape[1] == 1:
            predictions = predictions[:, 0]  # (N, 1) -> (N,)
        p, s = pearson(predictions, labels), spearman(predictions, labels)
        return {"pearson": p, "spearman": s, "corr": (p + s) / 2.0}
    if predictions.ndim == labels.ndim + 1:
        predictions = predictions.argmax(axis=-1)
    if task == "cola":
        return {"mcc": matthews_corrcoef(predictions, labels)}
    acc = accuracy(predictions, labels)
    if task in _PAIR_F1_TASKS:
        f1 = f1_binary(predictions, labels)
        return {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2.0}
    return {"acc": acc}
