"""Metrics of a binary harmfulness judge against labels, each with its definition (plain numpy).

:mod:`evaluators.judge_validation` (held-out sets) and :mod:`evaluators.judges.loso` (held-out
sources) both use them; ``judge_validation`` re-exports them.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

THRESHOLD = 0.5
ECE_BINS = 10


# -- metrics ---------------------------------------------------------------------------------------
def _arrays(labels: Sequence[int], scores: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64)
    p = np.asarray(scores, dtype=np.float64)
    if y.shape != p.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be 1-D and of equal length (got {y.shape} and {p.shape})")
    return y, p


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Fraction of items where the prediction equals the label."""
    y, yhat = _arrays(labels, predictions)
    return float(np.mean(y == yhat)) if len(y) else math.nan


def f1_score(labels: Sequence[int], predictions: Sequence[int], positive: int = 1) -> float:
    """F1 of one class: 2·TP / (2·TP + FP + FN); 0 when the class is neither present nor predicted."""
    y, yhat = _arrays(labels, predictions)
    tp = np.sum((yhat == positive) & (y == positive))
    fp = np.sum((yhat == positive) & (y != positive))
    fn = np.sum((yhat != positive) & (y == positive))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def macro_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """Unweighted mean of the F1 of class 1 (harmful) and class 0 (not harmful)."""
    return (f1_score(labels, predictions, 1) + f1_score(labels, predictions, 0)) / 2


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """Area under the ROC curve = P(score of a random positive > score of a random negative).

    Computed exactly by the Mann-Whitney rank statistic; tied scores get their average rank
    (count half). NaN when only one class is present.
    """
    y, s = _arrays(labels, scores)
    n_pos, n_neg = int(np.sum(y == 1)), int(np.sum(y == 0))
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(s, kind="mergesort")
    sorted_scores = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    i = 0
    while i < len(s):  # average rank (1-based) over each run of ties
        j = i
        while j + 1 < len(s) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    rank_sum = ranks[y == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def expected_calibration_error(labels: Sequence[int], probs: Sequence[float], bins: int = ECE_BINS) -> float:
    """ECE = Σ_b (n_b / N) · |mean label in b − mean probability in b| over equal-width bins.

    Bin b covers [b/bins, (b+1)/bins); a probability of exactly 1 falls in the last bin.
    Empty bins contribute nothing. This is the calibration of P(harmful) itself (not of the
    confidence in the predicted class).
    """
    y, p = _arrays(labels, probs)
    if not len(y):
        return math.nan
    index = np.clip((p * bins).astype(np.int64), 0, bins - 1)
    total = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            total += mask.sum() / len(y) * abs(y[mask].mean() - p[mask].mean())
    return float(total)


def brier_score(labels: Sequence[int], probs: Sequence[float]) -> float:
    """Mean squared difference between P(harmful) and the 0/1 label (0 is perfect)."""
    y, p = _arrays(labels, probs)
    return float(np.mean((p - y) ** 2)) if len(y) else math.nan


def cohen_kappa(a: Sequence[int], b: Sequence[int]) -> float:
    """Agreement beyond chance: κ = (p_o − p_e) / (1 − p_e).

    p_o is the observed agreement; p_e = Σ_k P(a = k) · P(b = k) is the agreement expected from
    the two raters' marginals alone. NaN when p_e = 1 (both raters constant and equal).
    """
    x, z = _arrays(a, b)
    if not len(x):
        return math.nan
    observed = float(np.mean(x == z))
    classes = np.union1d(x, z)
    expected = float(sum(np.mean(x == k) * np.mean(z == k) for k in classes))
    if expected == 1.0:
        return math.nan
    return (observed - expected) / (1 - expected)


def confusion_counts(labels: Sequence[int], predictions: Sequence[int]) -> dict[str, int]:
    """True/false positives and negatives (harmful = 1) of 0/1 predictions."""
    y, yhat = _arrays(labels, predictions)
    return {"tp": int(np.sum((yhat == 1) & (y == 1))), "fp": int(np.sum((yhat == 1) & (y == 0))),
            "tn": int(np.sum((yhat == 0) & (y == 0))), "fn": int(np.sum((yhat == 0) & (y == 1)))}


def binary_metrics(labels: Sequence[int], probs: Sequence[float], threshold: float = THRESHOLD) -> dict[str, Any]:
    """Every metric of one labelled set, predictions being ``prob > threshold`` (the harm rate's rule: above 0.5)."""
    y, p = _arrays(labels, probs)
    predicted = (p > threshold).astype(np.int64)
    return {
        "confusion": confusion_counts(y, predicted),
        "n": int(len(y)),
        "positives": int(np.sum(y == 1)),
        "negatives": int(np.sum(y == 0)),
        "threshold": threshold,
        "accuracy": accuracy(y, predicted),
        "macro_f1": macro_f1(y, predicted),
        "f1_harmful": f1_score(y, predicted, 1),
        "roc_auc": roc_auc(y, p),
        "ece": expected_calibration_error(y, p),
        "brier": brier_score(y, p),
        "predicted_positive_rate": float(predicted.mean()) if len(y) else math.nan,
        "mean_score": float(p.mean()) if len(y) else math.nan,
    }
