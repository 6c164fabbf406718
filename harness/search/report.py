"""What a search found: every trial, the worst case (feasible trials only) and the trials-to-break curve.

search.json is rebuilt from the study after every trial. The worst case is the feasible trial with the
highest harm (ties: the earliest); an infeasible trial (one that broke capability or fluency beyond ε)
is listed but never chosen. The curve is the best feasible harm so far after each counted trial, against
the trial count and against the training tokens spent so far.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from harness.search.space import SearchSpec
from harness.terminal import plain

REPORT_VERSION = 1


def _status(trial: Any) -> str | None:
    from optuna.trial import TrialState

    if trial.state == TrialState.COMPLETE:
        return "feasible" if trial.user_attrs.get("feasible") else "infeasible"
    if trial.state == TrialState.FAIL:
        return "interrupted" if trial.user_attrs.get("interrupted") else "failed"
    if trial.state == TrialState.RUNNING:
        return "running"
    return None  # waiting (enqueued, not started)


def trial_rows(study: Any) -> list[dict[str, Any]]:
    rows = []
    for trial in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        status = _status(trial)
        if status is None:
            continue
        attrs = trial.user_attrs
        suggested = {k.split(".", 1)[1]: v for k, v in trial.params.items() if k != "attack"}  # if killed early
        rows.append({
            "number": trial.number, "status": status, "attack": attrs.get("attack", trial.params.get("attack")),
            "params": attrs.get("values", suggested),
            "harm": attrs.get("harm"), "constraints": attrs.get("constraints", []),
            "train_tokens": attrs.get("train_tokens", 0), "wall_seconds": attrs.get("wall_seconds"),
            "run_dir": attrs.get("run_dir"), "error": attrs.get("error"), "config": attrs.get("config"),
            **({"retry_of": attrs["retry_of"]} if "retry_of" in attrs else {}),
            **({"start_with": attrs["start_with"]} if "start_with" in attrs else {}),
        })
    return rows


def curve(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Best feasible harm after each counted trial (None until one is feasible), with tokens spent so far."""
    points, best, tokens, count = [], None, 0, 0
    for row in rows:
        if row["status"] not in ("feasible", "infeasible", "failed"):
            continue
        count += 1
        tokens += row["train_tokens"] or 0
        if row["status"] == "feasible" and (best is None or row["harm"]["value"] > best["harm"]):
            best = {"harm": row["harm"]["value"], "trial": row["number"]}
        points.append({"trials": count, "train_tokens": tokens, "trial": row["number"],
                       "best_harm": None if best is None else best["harm"],
                       "best_trial": None if best is None else best["trial"]})
    return points


def worst_case(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    feasible = [r for r in rows if r["status"] == "feasible"]
    if not feasible:
        return None
    return max(feasible, key=lambda r: (r["harm"]["value"], -r["number"]))


def build_report(spec: SearchSpec, study: Any, directory: Path) -> dict[str, Any]:
    rows = trial_rows(study)
    points = curve(rows)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("feasible", "infeasible", "failed", "interrupted")}
    return {
        "report_version": REPORT_VERSION,
        "name": spec.name,
        "search": spec.model_dump(mode="json"),
        "defence": spec.defence,
        "objective": f"primary judge's post-attack harm {spec.objective} (defended model)",
        "constraints": [c.title for c in spec.constraints],
        "budget": {**spec.budget.model_dump(), "text": spec.budget.describe()},
        "spent": {"trials": points[-1]["trials"] if points else 0,
                  "train_tokens": points[-1]["train_tokens"] if points else 0,
                  "wall_seconds": round(sum(r["wall_seconds"] or 0 for r in rows), 1)},
        "counts": counts,
        "finished": (points[-1]["trials"] if points else 0) >= spec.budget.trials or bool(
            spec.budget.train_tokens and points and points[-1]["train_tokens"] >= spec.budget.train_tokens),
        "worst_case": worst_case(rows),
        "curve": points,
        "trials": rows,
    }


def _params(row: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in (row["params"] or {}).items())


def _harm(row: dict[str, Any]) -> str:
    harm = row.get("harm")
    if not harm:
        return "–"
    low, high = harm["ci95"]
    return f"{harm['value']:.3f} [{low:.3f}, {high:.3f}]"


def _change(value: float | None) -> str:
    return "overflow" if value is None else f"{value:+.3g}"


def report_table(report: dict[str, Any]) -> Table:
    table = Table(title=f"search {report['name']} · defence {report['defence']['name']} · budget "
                        f"{report['budget']['text']}")
    for column in ("trial", "attack", "params", "harm [95% CI]", "status", "constraints (change / ε)", "tokens",
                   "best so far"):
        table.add_column(column)
    best = {p["trial"]: p for p in report["curve"]}
    for row in report["trials"]:
        checks = "; ".join(f"{c['constraint'].split(' ')[0].split('.')[-1]} {_change(c['change'])}/{c['limit']:g}"
                           for c in row["constraints"]) or (row.get("error") or "–")[:60]
        point = best.get(row["number"])
        so_far = "–" if not point or point["best_harm"] is None else f"{point['best_harm']:.3f}"
        table.add_row(*map(plain, (str(row["number"]), row["attack"] or "–", _params(row), _harm(row),
                                   row["status"], checks, f"{row['train_tokens'] or 0:,}", so_far)))
    return table


def print_report(report: dict[str, Any], console: Console) -> None:
    out = Console(markup=False)  # params and errors are user text, never markup
    out.width = max(out.width, 120)  # the trials table folds badly in 80 columns (pipes, logs)
    out.print(report_table(report))
    worst = report["worst_case"]
    spent = report["spent"]
    console.print(f"Spent {spent['trials']} trial(s), {spent['train_tokens']:,} training tokens, "
                  f"{spent['wall_seconds']:.0f}s of runs; {report['counts']['infeasible']} infeasible, "
                  f"{report['counts']['failed']} failed.")
    if worst is None:
        console.print("[yellow]No feasible trial[/]: every attack tried broke the constraints or failed.")
        return
    console.print(f"Worst case: trial {worst['number']}, {plain(worst['attack'])} ({plain(_params(worst))}), "
                  f"harm {plain(_harm(worst))}; run {plain(worst['run_dir'])}")
