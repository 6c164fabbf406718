"""The intervals printed with every number, against their formulas."""

import math

import pytest

from harness.stats import mean_ci, t_interval, wilson_ci


def test_normal_interval_matches_the_formula_and_is_clipped_to_scores():
    values = [0.1, 0.9, 0.5, 0.3]
    mean = sum(values) / 4
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 3)
    half = 1.959963984540054 * sd / 2
    assert mean_ci(values) == pytest.approx((mean, mean - half, mean + half))
    assert mean_ci([0.0, 0.0, 1.0])[1] == 0.0  # clipped at 0
    assert mean_ci([0.4]) == (0.4, 0.4, 0.4)
    assert all(math.isnan(x) for x in mean_ci([]))


def test_wilson_interval_matches_published_values():
    # 0 of 10: the Wilson upper bound is z²/(n+z²) = 0.2775 (not 0, as the normal interval would say).
    assert wilson_ci(0, 10) == pytest.approx((0.0, 0.0, 0.2775), abs=1e-4)
    rate, low, high = wilson_ci(50, 100)
    assert (rate, low, high) == pytest.approx((0.5, 0.4038, 0.5962), abs=1e-4)


def test_student_t_interval_over_seeds():
    values = [0.12, 0.75, 0.79]  # e.g. three seeds of one strong attack
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t(0.975, df=2)
    assert t_interval(values) == pytest.approx((mean, mean - half, mean + half))
    assert t_interval([0.3]) == (0.3, 0.3, 0.3)  # one seed: no spread to estimate
