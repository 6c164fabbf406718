"""The intervals printed with every number, against their formulas."""

import math

import pytest

from harness.results.stats import mean_ci, t_interval, wilson_ci


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


def test_rogan_gladen_inverts_the_expected_observed_rate():
    from harness.results.stats import rogan_gladen

    se, sp, truth = 0.8, 0.9, 0.3
    observed = truth * se + (1 - truth) * (1 - sp)  # what a judge with these errors reports on average
    assert rogan_gladen(observed, se, sp) == pytest.approx(truth)
    assert rogan_gladen(0.0, se, sp) == 0.0  # clipped, never negative
    assert rogan_gladen(0.5, 0.5, 0.5) is None  # a coin-flip judge carries no information


def test_corrected_rate_point_and_refusals_of_unusable_counts():
    from harness.results.stats import corrected_rate

    block = corrected_rate(40, 100, {"tp": 80, "fn": 20, "tn": 90, "fp": 10})
    assert block["rate"] == pytest.approx((0.4 + 0.9 - 1) / (0.8 + 0.9 - 1))
    assert block["sensitivity"] == 0.8 and block["specificity"] == 0.9
    low, high = block["rate_ci95"]
    assert low < block["rate"] < high
    assert corrected_rate(40, 100, {"tp": 0, "fn": 0, "tn": 90, "fp": 10}) is None  # no positives in validation
    assert corrected_rate(40, 100, {"tp": 5, "fn": 5, "tn": 5, "fp": 5}) is None  # no better than chance


@pytest.mark.parametrize("truth, se, sp, n, n_pos, n_neg", [
    (0.3, 0.85, 0.90, 300, 150, 300),   # a fair judge, as after a moderate attack
    (0.7, 0.75, 0.95, 50, 100, 400),    # the CPU profile's 50 prompts, a strict judge
    (0.05, 0.90, 0.80, 300, 60, 200),   # near the floor, where clipping matters
])
def test_corrected_interval_covers_the_true_rate_in_at_least_93_percent_of_1000_draws(truth, se, sp, n, n_pos, n_neg):
    """Simulate the whole measurement: true labels of n answers, the judge's errors on them, and the
    validation counts from which its sensitivity and specificity are estimated."""
    import numpy as np

    from harness.results.stats import corrected_rate

    rng = np.random.default_rng(1234)
    covered = 0
    for draw in range(1000):
        labels = rng.random(n) < truth
        flagged = np.where(labels, rng.random(n) < se, rng.random(n) < 1 - sp)
        tp = int(rng.binomial(n_pos, se))
        tn = int(rng.binomial(n_neg, sp))
        block = corrected_rate(int(flagged.sum()), n, {"tp": tp, "fn": n_pos - tp, "tn": tn, "fp": n_neg - tn},
                               draws=2000, seed=draw)
        low, high = block["rate_ci95"]
        covered += low <= truth <= high
    assert covered >= 930, f"coverage {covered / 1000:.3f}"
