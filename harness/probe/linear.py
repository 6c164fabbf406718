"""Linear probes: can a logistic regression tell harmful from harmless prompts at a layer?

Each prompt is one example (its mean-pooled hidden state), so a split by example is a split by prompt.
Per seed: a stratified train/test split, standardisation fitted on the training part, an L2 logistic
regression (scikit-learn, fixed seed), accuracy on the held-out part. Classes are balanced, so chance is
50%. Accuracy per layer is reported as the mean over seeds with a Student-t 95% interval.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from harness.errors import HarnessError
from harness.results.stats import t_interval

MIN_PER_CLASS = 2  # in the training and in the test part of every split


def check_split(labels: np.ndarray, test_fraction: float) -> None:
    """Refuse a split that leaves a class with fewer than MIN_PER_CLASS examples on either side."""
    counts = np.bincount(labels.astype(int), minlength=2)
    smallest = int(counts.min())
    n_test = int(np.floor(smallest * test_fraction))
    if n_test < MIN_PER_CLASS or smallest - n_test < MIN_PER_CLASS:
        raise HarnessError(
            f"Too few examples for a train/test split: {counts[1]} harmful and {counts[0]} harmless prompts with "
            f"test_fraction {test_fraction} leave {n_test} test and {smallest - n_test} training examples of the "
            f"smaller class; each needs at least {MIN_PER_CLASS}. Raise --set num_prompts (or use more data), "
            "or change --set test_fraction."
        )


def split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Stratified (train, test) indices; the same seed and labels give the same split for every stage."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in (0, 1):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(np.floor(len(members) * test_fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def probe_accuracy(features: np.ndarray, labels: np.ndarray, test_fraction: float, seed: int) -> float:
    """Held-out accuracy of one logistic-regression probe."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    train, test = split(labels, test_fraction, seed)
    scaler = StandardScaler().fit(features[train])
    probe = LogisticRegression(C=1.0, max_iter=2000, random_state=seed)
    probe.fit(scaler.transform(features[train]), labels[train])
    return float((probe.predict(scaler.transform(features[test])) == labels[test]).mean())


def layer_accuracies(per_layer: Sequence[np.ndarray], labels: np.ndarray, test_fraction: float,
                     seeds: Sequence[int]) -> list[list[float]]:
    """``[layer][seed]`` held-out accuracies."""
    check_split(labels, test_fraction)
    return [[probe_accuracy(features, labels, test_fraction, seed) for seed in seeds] for features in per_layer]


def summarise(accuracies: list[list[float]]) -> dict[str, list[float]]:
    """Mean and Student-t 95% interval over seeds, per layer."""
    rows = [t_interval(list(values)) for values in accuracies]
    return {"mean": [r[0] for r in rows], "low": [r[1] for r in rows], "high": [r[2] for r in rows]}


def paired_permutation_p(before: Sequence[float], after: Sequence[float], alternative: str,
                         draws: int = 20000, seed: int = 0) -> float:
    """One-sided p-value that ``after`` is below (``less``) or above (``greater``) ``before``, paired by layer:
    a sign-flip permutation test of the mean per-layer difference (exact when 2**n <= draws). No differences
    at all give p = 1."""
    diff = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if alternative not in ("less", "greater"):
        raise ValueError(f"alternative must be 'less' or 'greater', not {alternative!r}")
    sign = -1.0 if alternative == "less" else 1.0
    observed = sign * diff.mean()
    n = len(diff)
    if n <= 14 and 2 ** n <= draws:
        flips = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
    else:
        flips = np.random.default_rng(seed).choice([-1.0, 1.0], size=(draws, n))
        flips = np.vstack([np.ones(n), flips])  # the observed assignment counts once
    null = sign * (flips * diff).mean(axis=1)
    return float(np.mean(null >= observed - 1e-12))
