"""Confidence intervals used in results and the leaderboard (stated with every number)."""

from __future__ import annotations

import math
from statistics import NormalDist


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
