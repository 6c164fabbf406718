"""Platt scaling: P(harmful) = sigmoid(scale · logit + bias), with scale > 0 so the ranking is kept.

A judge trained on in-distribution data can rank answers well and still put the wrong numbers on
them under a shift: the harness reports the *mean* P(harmful), so those numbers are the result.
Two parameters fitted by maximum likelihood on a labelled set close to the use case fix the level
without touching the order (ROC-AUC is unchanged).
"""

from __future__ import annotations

import torch

MIN_PER_CLASS = 5  # fewer labelled examples of either class than this: no calibration is fitted


def fit_platt(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    """(scale, bias) minimising the log-loss of sigmoid(scale · logits + bias) against 0/1 labels."""
    logits, labels = logits.detach().double().flatten(), labels.detach().double().flatten()
    positives = int(labels.sum())
    if min(positives, len(labels) - positives) < MIN_PER_CLASS:
        raise ValueError(f"Platt scaling needs at least {MIN_PER_CLASS} examples of each class "
                         f"(got {positives} positive, {len(labels) - positives} negative)")
    log_scale = torch.zeros((), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_scale, bias], max_iter=500, tolerance_grad=1e-10,
                                  tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def loss() -> torch.Tensor:
        optimizer.zero_grad()
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits * log_scale.exp() + bias, labels)
        value.backward()
        return value

    optimizer.step(loss)
    return float(log_scale.detach().exp()), float(bias.detach())


def apply_platt(logits: torch.Tensor, scale: float, bias: float) -> torch.Tensor:
    return torch.sigmoid(logits * scale + bias)
