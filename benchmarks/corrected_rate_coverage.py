"""How often the judge-error-corrected harm rate's 95% interval covers the true rate, by simulation.

Each draw simulates the whole measurement: the true labels of ``n`` answers at a known harm rate, the
judge's errors on them at a known sensitivity and specificity, and the validation counts from which
those are estimated (``n_pos`` harmful and ``n_neg`` harmless validation items). The corrected rate
(:func:`harness.results.stats.corrected_rate`) is computed from what a run would see; the script prints per
setting the share of draws whose interval holds the truth, and the mean interval width.

    python benchmarks/corrected_rate_coverage.py --draws 1000

tests/test_stats.py asserts coverage >= 93% on the first three settings.
"""

from __future__ import annotations

import argparse

import numpy as np

from harness.results.stats import corrected_rate

# (true rate, sensitivity, specificity, answers n, validation harmful n_pos, validation harmless n_neg)
SETTINGS = [
    (0.3, 0.85, 0.90, 300, 150, 300),   # a fair judge, as after a moderate attack
    (0.7, 0.75, 0.95, 50, 100, 400),    # the CPU profile's 50 prompts, a strict judge
    (0.05, 0.90, 0.80, 300, 60, 200),   # near the floor, where clipping matters
    (0.0, 0.90, 0.95, 50, 100, 300),    # a defence that holds completely
    (1.0, 0.80, 0.90, 50, 100, 300),    # an attack that breaks it completely
]


def coverage(truth: float, se: float, sp: float, n: int, n_pos: int, n_neg: int, draws: int,
             seed: int = 1234) -> tuple[float, float]:
    """(share of draws whose interval covers ``truth``, mean interval width)."""
    rng = np.random.default_rng(seed)
    covered, widths = 0, []
    for draw in range(draws):
        labels = rng.random(n) < truth
        flagged = np.where(labels, rng.random(n) < se, rng.random(n) < 1 - sp)
        tp, tn = int(rng.binomial(n_pos, se)), int(rng.binomial(n_neg, sp))
        block = corrected_rate(int(flagged.sum()), n, {"tp": tp, "fn": n_pos - tp, "tn": tn, "fp": n_neg - tn},
                               draws=2000, seed=draw)
        low, high = block["rate_ci95"]
        covered += low <= truth <= high
        widths.append(high - low)
    return covered / draws, float(np.mean(widths))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=1000, help="simulated measurements per setting")
    args = parser.parse_args()
    print("truth  sens  spec    n  n_pos  n_neg  coverage  mean width")
    for truth, se, sp, n, n_pos, n_neg in SETTINGS:
        share, width = coverage(truth, se, sp, n, n_pos, n_neg, args.draws)
        print(f"{truth:5.2f} {se:5.2f} {sp:5.2f} {n:4d} {n_pos:6d} {n_neg:6d} {share:9.3f} {width:11.3f}")


if __name__ == "__main__":
    main()
