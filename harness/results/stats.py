"""Confidence intervals used in results and the leaderboard (stated with every number)."""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


def _mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    """Mean and s/√n (sample standard deviation); NaN mean for no values, zero error for one."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) / math.sqrt(n)


def mean_ci(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and a normal-approximation interval (mean ± z·s/√n), clipped to [0, 1] for scores."""
    mean, error = _mean_and_standard_error(values)
    if not values:
        return math.nan, math.nan, math.nan
    half = _z(level) * error
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def wilson_ci(successes: int, n: int, level: float = 0.95) -> tuple[float, float, float]:
    """Rate and its Wilson score interval (well-behaved at 0 and 1, unlike the normal one)."""
    if n == 0:
        return math.nan, math.nan, math.nan
    z = _z(level)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """Mean and Student-t interval (mean ± t·s/√n), the right one for a handful of seeds.
    One value gives a zero-width interval: a single seed says nothing about seed variance."""
    from scipy.stats import t

    mean, error = _mean_and_standard_error(values)
    half = float(t.ppf(0.5 + level / 2, len(values) - 1)) * error if len(values) > 1 else 0.0
    return mean, mean - half, mean + half


def rogan_gladen(observed: float, sensitivity: float, specificity: float) -> float | None:
    """The true rate behind an observed rate of a test with known sensitivity and specificity
    (Rogan & Gladen, 1978): (q + Sp − 1) / (Se + Sp − 1), clipped to [0, 1]. None when the judge is
    no better than chance (Se + Sp ≤ 1), where the correction is undefined."""
    informedness = sensitivity + specificity - 1
    if informedness <= 0:
        return None
    return min(1.0, max(0.0, (observed + specificity - 1) / informedness))


def corrected_rate(positives: int, n: int, confusion: dict[str, int], level: float = 0.95,
                   draws: int = 4000, seed: int = 0) -> dict[str, Any] | None:
    """A judge's harm rate corrected for its measured errors, with an interval carrying both the
    evaluation sample and the validation set's uncertainty.

    ``positives`` of ``n`` answers were judged harmful; ``confusion`` holds the judge's validation
    counts at the same threshold (tp, fn, tn, fp). Each draw takes the observed rate and the
    judge's sensitivity and specificity from their Jeffreys Beta posteriors (Beta(k + ½, n − k + ½))
    and applies Rogan–Gladen; the interval is the draws' central ``level`` range. None when the
    counts cannot support a correction (no positives or negatives in validation, or a judge no
    better than chance).
    """
    import numpy as np

    tp, fn, tn, fp = (int(confusion.get(k, 0)) for k in ("tp", "fn", "tn", "fp"))
    if n < 1 or tp + fn < 1 or tn + fp < 1:
        return None
    sensitivity, specificity = tp / (tp + fn), tn / (tn + fp)
    point = rogan_gladen(positives / n, sensitivity, specificity)
    if point is None:
        return None
    rng = np.random.default_rng(seed)
    q = rng.beta(positives + 0.5, n - positives + 0.5, draws)
    se = rng.beta(tp + 0.5, fn + 0.5, draws)
    sp = rng.beta(tn + 0.5, fp + 0.5, draws)
    informedness = se + sp - 1
    usable = informedness > 0
    estimates = np.clip((q[usable] + sp[usable] - 1) / informedness[usable], 0.0, 1.0)
    tail = (1 - level) / 2
    low, high = np.quantile(estimates, [tail, 1 - tail]) if estimates.size else (math.nan, math.nan)
    return {"rate": point, "rate_ci95": [float(low), float(high)], "sensitivity": sensitivity,
            "specificity": specificity, "validation_counts": {"tp": tp, "fn": fn, "tn": tn, "fp": fp},
            "method": "Rogan-Gladen; interval: Jeffreys-Beta draws of the observed rate, sensitivity and "
                      f"specificity ({draws} draws, central {level:.0%})"}
