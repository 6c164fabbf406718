"""Platt scaling against data drawn from a known logistic model."""

import pytest
import torch

from evaluators.judge_validation import roc_auc
from evaluators.judges.calibration import MIN_PER_CLASS, apply_platt, fit_platt


def test_recovers_the_generating_scale_and_bias():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(40_000, generator=generator) * 2
    labels = torch.bernoulli(torch.sigmoid(0.5 * logits - 1.5), generator=generator)
    scale, bias = fit_platt(logits, labels)
    assert scale == pytest.approx(0.5, abs=0.03) and bias == pytest.approx(-1.5, abs=0.05)
    # at the maximum-likelihood fit the mean prediction equals the observed rate (the bias gradient is 0)
    assert float(apply_platt(logits, scale, bias).mean()) == pytest.approx(float(labels.mean()), abs=1e-4)


def test_keeps_the_order_so_roc_auc_is_unchanged():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(500, generator=generator)
    labels = torch.bernoulli(torch.sigmoid(3 * logits + 1), generator=generator)
    scale, bias = fit_platt(logits, labels)
    assert scale > 0
    calibrated = apply_platt(logits, scale, bias)
    assert roc_auc(labels.int().tolist(), calibrated.tolist()) == roc_auc(labels.int().tolist(), logits.tolist())


def test_too_few_of_a_class_is_refused():
    logits = torch.linspace(-2, 2, 50)
    labels = torch.zeros(50)
    labels[: MIN_PER_CLASS - 1] = 1
    with pytest.raises(ValueError, match="each class"):
        fit_platt(logits, labels)
