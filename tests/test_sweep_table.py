"""The sweep's Table-1 matrix: seeds averaged with the Student-t interval, capability deltas against
the undefended branch, and the over-refusal rate beside harm."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from harness.results.sweep_table import render_markdown, sweep_matrix


def _phase(harm: float, capability: float | None = None, refuses: float | None = None) -> dict:
    headlines = {}
    if capability is not None:
        headlines["capability"] = {"metric": "mean_acc", "value": capability}
    if refuses is not None:
        headlines["over-refusal"] = {"metric": "refusal_rate", "value": refuses}
    return {"harmfulness": {"judge": "j", "mean": harm}, "headlines": headlines}


def _results(pre: dict, post: dict, reference: tuple[dict, dict] | None = None) -> dict:
    branches = {"defended": {"pre_attack": pre, "post_attack": post}}
    if reference:
        branches["undefended"] = {"pre_attack": reference[0], "post_attack": reference[1]}
    return {"summary": {"branches": branches}}


def test_matrix_averages_seeds_and_shows_capability_delta_and_over_refusal():
    cells = [SimpleNamespace(defence="shield", attack="a", seed=s) for s in (1, 2)]
    reference = (_phase(0.5, capability=0.60), _phase(0.9, capability=0.58))
    results = [_results(_phase(0.1, 0.55, 0.40), _phase(0.2, 0.50, 0.30), reference),
               _results(_phase(0.1, 0.55, 0.60), _phase(0.4, 0.54, 0.50), reference)]
    matrix = sweep_matrix(cells, results)
    post = matrix["cells"]["shield"]["a"]
    assert post["harm"]["mean"] == pytest.approx(0.3) and post["harm"]["n_seeds"] == 2
    assert post["capability_delta"]["mean"] == pytest.approx(((0.50 - 0.58) + (0.54 - 0.58)) / 2)
    assert post["over_refusal"]["mean"] == pytest.approx(0.4)
    assert matrix["cells"]["shield"]["pre-attack"]["over_refusal"]["mean"] == pytest.approx(0.5)
    line = render_markdown(matrix).splitlines()[-1]
    assert line == "| shield | 0.10 ±0.00 (Δcap -0.05, refuses 0.50) | 0.30 ±1.27 (Δcap -0.06, refuses 0.40) |"


def test_matrix_without_over_refusal_shows_harm_only_and_skips_failed_cells():
    cells = [SimpleNamespace(defence="none", attack="a", seed=1), SimpleNamespace(defence="none", attack="a", seed=2)]
    matrix = sweep_matrix(cells, [_results(_phase(0.3), _phase(0.6)), None])
    cell = matrix["cells"]["none"]["a"]
    assert cell["harm"]["values"] == [0.6] and cell["over_refusal"] is None and cell["capability_delta"] is None
    assert render_markdown(matrix).splitlines()[-1] == "| none | 0.30 | 0.60 |"
