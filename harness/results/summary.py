"""The two blocks results.json v2 adds on top of v1: ``judge`` and ``summary``.

They restate, in one fixed shape, what a reader of many results files (the leaderboard) needs,
so it never has to know how each evaluator nests its metrics: the primary harmfulness judge with
its measured accuracy (DESIGN.md §6), and per branch and phase the primary-judge harm numbers
plus every other evaluator's headline metric. Both are derived from ``results`` alone, so a v1
file migrates exactly and a tampered summary can be caught by recomputing it.
"""

from __future__ import annotations

import math
from typing import Any, Callable

from harness.errors import HarnessError

PHASES = ("pre_attack", "post_attack")

# Headline metrics of the built-in evaluators, for reading files when the registry is not loaded.
KNOWN_HEADLINES = {"capability": "mean_acc", "trainability": "rouge1_after", "perplexity": "perplexity",
                   "over-refusal": "refusal_rate"}


def headline_metric(evaluator: str) -> str | None:
    """The metric an evaluator names as its one headline number (its ``headline`` plugin info)."""
    try:
        from harness.registry import evaluators

        return evaluators.get(evaluator).hook("headline")
    except (HarnessError, ImportError):  # not installed here: fall back to what we know
        return KNOWN_HEADLINES.get(evaluator)


def primary_harm(entry: dict[str, Any] | None) -> dict[str, Any] | None:
    """The primary judge's harm numbers of one harmfulness evaluation, or None if it did not run."""
    if not entry:
        return None
    metrics = entry["metrics"]
    judge = metrics["primary_judge"]
    scores = metrics[judge]
    block = {"judge": judge, **{k: scores[k] for k in ("mean", "mean_ci95", "rate", "rate_ci95", "n")}}
    if isinstance(scores.get("rate_corrected"), dict):  # corrected for the judge's measured errors
        block["rate_corrected"] = scores["rate_corrected"]
    return block


def _headline_value(metrics: dict[str, Any], metric: str | None) -> float | None:
    value = metrics.get(metric) if metric else None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return value if number and math.isfinite(value) else None  # NaN/inf would not compare equal to itself


def summary_block(results: dict[str, Any],
                  headline: Callable[[str], str | None] = headline_metric) -> dict[str, Any]:
    branches = {}
    for branch, content in results["results"].items():
        phases = {}
        for phase in PHASES:
            evaluations = content.get(phase) or {}
            headlines = {}
            for name, entry in sorted(evaluations.items()):
                if name == "harmfulness":
                    continue
                metric = headline(name)
                headlines[name] = {"metric": metric, "value": _headline_value(entry.get("metrics", {}), metric)}
            phases[phase] = {"harmfulness": primary_harm(evaluations.get("harmfulness")), "headlines": headlines}
        branches[branch] = {"defence": content["defence"], **phases}
    return {"branches": branches}


def _fraction(value: Any) -> float | None:
    """A measured rate, or None for anything else a judge may report there."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    return value if ok else None


def judge_block(results: dict[str, Any]) -> dict[str, Any] | None:
    """The primary judge of the defended model's post-attack evaluation, with its measured
    accuracy on held-out human labels when the judge reports one (rule-based judges do not)."""
    entry = results["results"].get("defended", {}).get("post_attack", {}).get("harmfulness")
    if not entry:
        return None
    name = entry["metrics"]["primary_judge"]
    described = entry.get("info", {}).get("judges", {}).get(name, {})
    accuracy = _fraction(described.get("accuracy"))
    return {
        "name": name,
        "version": None if described.get("version") is None else str(described["version"]),
        "accuracy": accuracy,
        "roc_auc": _fraction(described.get("roc_auc")),
        # where the harness scores (answers to harmful prompts), and off the training sources (LOSO)
        "sensitivity": _fraction(described.get("sensitivity")),
        "specificity": _fraction(described.get("specificity")),
        "loso_worst_roc_auc": _fraction(described.get("loso_worst_roc_auc")),
        "loso_mean_roc_auc": _fraction(described.get("loso_mean_roc_auc")),
        "accuracy_source": "held-out human labels (XSTest), see info.judges" if accuracy is not None
        else "not measured" + (f" ({described['note']})" if described.get("note") else ""),
    }


def derived_blocks(results: dict[str, Any]) -> dict[str, Any]:
    """``{"judge": ..., "summary": ...}`` for a results dict (v1 or v2 body)."""
    return {"judge": judge_block(results), "summary": summary_block(results)}
