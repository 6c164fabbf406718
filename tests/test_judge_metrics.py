"""Judge validation metrics against values computed by hand."""

from __future__ import annotations

import math

import pytest

from evaluators.judge_validation import (
    accuracy,
    binary_metrics,
    brier_score,
    cohen_kappa,
    confusion_counts,
    error_rates,
    expected_calibration_error,
    f1_score,
    macro_f1,
    render_validation,
    roc_auc,
    validation_tables,
)

LABELS = [1, 1, 1, 0, 0, 0, 0, 0]
SCORES = [0.9, 0.6, 0.4, 0.7, 0.3, 0.2, 0.1, 0.1]


def test_accuracy_and_f1_by_hand():
    predicted = [int(s >= 0.5) for s in SCORES]  # [1, 1, 0, 1, 0, 0, 0, 0]
    # TP=2, FN=1, FP=1, TN=4
    assert accuracy(LABELS, predicted) == pytest.approx(6 / 8)
    assert f1_score(LABELS, predicted, 1) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))  # 2/3
    assert f1_score(LABELS, predicted, 0) == pytest.approx(2 * 4 / (2 * 4 + 1 + 1))  # 4/5
    assert macro_f1(LABELS, predicted) == pytest.approx((2 / 3 + 4 / 5) / 2)


def test_f1_of_an_absent_class_is_zero():
    assert f1_score([0, 0], [0, 0], 1) == 0.0
    assert macro_f1([0, 0], [0, 0]) == pytest.approx(0.5)


def test_roc_auc_counts_pairs():
    # positives 0.9, 0.6, 0.4 vs negatives 0.7, 0.3, 0.2, 0.1, 0.1: 15 pairs.
    # 0.9 beats all 5; 0.6 beats 4 (not 0.7); 0.4 beats 4 -> 13/15
    assert roc_auc(LABELS, SCORES) == pytest.approx(13 / 15)


def test_roc_auc_ties_count_half_and_degenerate_cases():
    assert roc_auc([1, 0], [0.5, 0.5]) == pytest.approx(0.5)
    assert roc_auc([1, 1, 0], [0.5, 0.9, 0.5]) == pytest.approx((0.5 + 1) / 2)
    assert roc_auc([0, 1], [0.1, 0.9]) == 1.0
    assert roc_auc([1, 0], [0.1, 0.9]) == 0.0
    assert math.isnan(roc_auc([1, 1], [0.1, 0.9]))


def test_ece_by_hand():
    # bins: 0.9 -> [0.9,1]: {1} acc 1, conf 0.9 -> |0.1| * 1/8
    # 0.6 -> [0.6,0.7): {1} -> 0.4; 0.7 -> [0.7,0.8): {0} -> 0.7; 0.4 -> [0.4,0.5): {1} -> 0.6
    # 0.3 -> {0} 0.3; 0.2 -> {0} 0.2; 0.1,0.1 -> [0.1,0.2): two 0s, conf 0.1 -> 0.1 with weight 2/8
    expected = (0.1 + 0.4 + 0.7 + 0.6 + 0.3 + 0.2 + 2 * 0.1) / 8
    assert expected_calibration_error(LABELS, SCORES) == pytest.approx(expected)


def test_ece_edge_bins_and_perfect_calibration():
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)  # 1.0 goes in the last bin
    # one bin [0.5, 0.6) holding two items with mean label 0.5 and mean prob 0.5
    assert expected_calibration_error([1, 0], [0.5, 0.5]) == pytest.approx(0.0)
    assert expected_calibration_error([1, 1], [0.55, 0.55]) == pytest.approx(0.45)


def test_brier_by_hand():
    expected = (0.1**2 + 0.4**2 + 0.6**2 + 0.7**2 + 0.3**2 + 0.2**2 + 0.1**2 + 0.1**2) / 8
    assert brier_score(LABELS, SCORES) == pytest.approx(expected)


def test_cohen_kappa_by_hand():
    a = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    b = [1, 1, 1, 0, 0, 0, 0, 0, 0, 1]
    # p_o = 8/10; p_e = 0.4*0.4 + 0.6*0.6 = 0.52; kappa = (0.8 - 0.52) / 0.48
    assert cohen_kappa(a, b) == pytest.approx((0.8 - 0.52) / 0.48)
    assert cohen_kappa(a, a) == pytest.approx(1.0)
    assert cohen_kappa([1, 0], [0, 1]) == pytest.approx(-1.0)
    assert math.isnan(cohen_kappa([1, 1], [1, 1]))


def test_binary_metrics_bundle_and_table():
    metrics = binary_metrics(LABELS, SCORES)
    assert (metrics["n"], metrics["positives"], metrics["negatives"]) == (8, 3, 5)
    assert metrics["accuracy"] == pytest.approx(0.75)
    assert metrics["roc_auc"] == pytest.approx(13 / 15)
    assert metrics["confusion"] == {"tp": 2, "fp": 1, "tn": 4, "fn": 1}
    metrics_in = {"judge": "x", "version": "v", "xstest": metrics,
                  "llamaguard2_jbb": {"n": 3, "prompts": 1, "agreement": 1.0, "cohen_kappa": math.nan, "roc_auc": 0.5}}
    (table,) = validation_tables(metrics_in)
    assert table.row_count == 10
    assert len(render_validation(metrics_in).renderables) == 1


def test_confusion_counts_and_error_rates_by_hand():
    predicted = [int(s >= 0.5) for s in SCORES]  # [1, 1, 0, 1, 0, 0, 0, 0]
    assert confusion_counts(LABELS, predicted) == {"tp": 2, "fp": 1, "tn": 4, "fn": 1}
    rates = error_rates({"one": (LABELS, SCORES), "two": ([1, 0], [0.9, 0.1])})
    assert rates["confusion"] == {"tp": 3, "fp": 1, "tn": 5, "fn": 1}
    assert rates["sensitivity"]["value"] == pytest.approx(3 / 4)
    assert rates["specificity"]["value"] == pytest.approx(5 / 6)
    lo, hi = rates["sensitivity"]["ci95"]
    assert lo < 3 / 4 < hi
    assert rates["sets"]["one"]["sensitivity"]["value"] == pytest.approx(2 / 3)
    assert rates["sets"]["two"]["specificity"]["value"] == 1.0
    assert math.isnan(error_rates({"none": ([0], [0.2])})["sensitivity"]["value"])


def test_mismatched_lengths_are_an_error():
    with pytest.raises(ValueError):
        roc_auc([1, 0], [0.5])
