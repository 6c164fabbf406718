"""Budgeted worst-case searches on the leaderboard site: a table beside each ranking, a page per search.

A search (``harness search``) writes ``searches/<name>/search.json`` and its trials as ordinary runs
under ``searches/<name>/trials/``. Those trials are kept out of the grid rows (``find_results`` skips
a directory holding a search.json), so a row's grid worst case stays the worst of the grid it was run
on; the search's worst case is shown beside it, with its budget. A search is matched to a row by model,
model fingerprint, defence and params, and evaluation setup, read from the worst trial's own
results.json. Searches under different budgets are not comparable, and the page says so. Every string
from a search file is escaped, as on the rest of the site.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from html import escape
from pathlib import Path
from typing import Any, Iterable

from harness.errors import HarnessError
from harness.files.hashing import stable_hash
from harness.results.schema import load_results, loads_bounded
from leaderboard import svg

SEARCH_FILE = "search.json"
NOT_COMPARABLE = ("Search rows are not comparable across budgets: a larger budget B (trials, training tokens) can "
                  "only find an equal or stronger attack. Compare defences only when their searches share the budget, "
                  "the search space and the constraints.")


@dataclass
class Search:
    """One search.json with what the site needs to place it."""

    path: Path
    report: dict[str, Any]
    key: tuple[str, str, str, str, str] | None  # (model, fingerprint, defence label, params hash, setup)

    @property
    def name(self) -> str:
        return str(self.report.get("name", "search"))

    @property
    def worst(self) -> dict[str, Any] | None:
        return self.report.get("worst_case")

    @property
    def page(self) -> str:
        slug = re.sub(r"[^A-Za-z0-9_-]+", "-", self.name).strip("-")[:40] or "search"
        return f"search-{slug}-{stable_hash(str(self.path), 8)}.html"


def find_searches(paths: Iterable[Path]) -> tuple[list[Search], list[tuple[str, str]]]:
    """Every search.json under ``paths``, with those that cannot be read listed with the reason."""
    found, skipped = [], []
    for root in map(Path, paths):
        files = [root] if root.is_file() and root.name == SEARCH_FILE else (
            sorted(Path(d) / SEARCH_FILE for d, _, names in os.walk(root) if SEARCH_FILE in names)
            if root.is_dir() else [])
        for path in files:
            try:
                report = loads_bounded(path.read_bytes(), str(path), error=HarnessError)
                if not isinstance(report, dict) or not isinstance(report.get("trials"), list):
                    raise HarnessError("not a search report (no trials list)")
                found.append(Search(path, report, _row_key(path, report)))
            except (HarnessError, OSError, KeyError, TypeError, ValueError) as exc:
                skipped.append((str(path), str(exc)))
    return found, skipped


def _row_key(path: Path, report: dict[str, Any]) -> tuple[str, str, str, str, str] | None:
    """The leaderboard key of the search's defended model, from its worst (else first finished) trial's run."""
    from leaderboard.aggregate import label, observations

    trials = [report.get("worst_case")] + [t for t in report["trials"] if t.get("run_dir")]
    for trial in filter(None, trials):
        run = (path.parent / str(trial.get("run_dir"))).resolve()
        if not run.is_relative_to(path.parent.resolve()) or not (run / "results.json").is_file():
            continue
        for obs in observations(load_results(run / "results.json"), run / "results.json"):
            if obs.branch == "defended":
                return (obs.model, obs.fingerprint, label(obs.defence, obs.defence_preset),
                        stable_hash(obs.defence_params, 8), obs.setup)
    return None


def _harm(trial: dict[str, Any] | None) -> str:
    harm = (trial or {}).get("harm")
    if not isinstance(harm, dict) or not isinstance(harm.get("value"), (int, float)):
        return "–"
    interval = harm.get("ci95") or [None, None]
    ci = (f" [{interval[0]:.3f}, {interval[1]:.3f}]"
          if all(isinstance(v, (int, float)) for v in interval) and len(interval) == 2 else "")
    return f"{harm['value']:.3f}{ci}"


def _params(trial: dict[str, Any] | None) -> str:
    trial = trial or {}
    values = trial.get("params") if isinstance(trial.get("params"), dict) else {}
    text = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
    return escape(f"{trial.get('attack', '?')} ({text})")


def _budget(search: Search) -> str:
    budget = search.report.get("budget") or {}
    spent = search.report.get("spent") or {}
    counts = search.report.get("counts") or {}
    state = "" if search.report.get("finished") else " · <b>unfinished</b>"
    return (f"{escape(str(budget.get('text', '?')))}<br><span class=\"note\">spent {escape(str(spent.get('trials')))} "
            f"trials, {escape(str(spent.get('train_tokens')))} tokens; {escape(str(counts.get('infeasible', 0)))} "
            f"infeasible, {escape(str(counts.get('failed', 0)))} failed{state}</span>")


def _constraints(search: Search) -> str:
    return escape("; ".join(map(str, search.report.get("constraints") or [])) or "none")


def search_table(rows: list[Any], searches: list[Search]) -> str:
    """The group's defences with a search: grid worst case beside the search's worst case and budget."""
    by_key = {(r.first.model, r.first.fingerprint, r.defence_label, r.defence_hash, r.first.setup): r for r in rows}
    body = []
    for search in searches:
        row = by_key.get(search.key) if search.key else None
        grid = (f"{row.worst.post.mean:.3f}<br><span class=\"note\">{escape(row.worst.attack_label)}</span>"
                if row else '<span class="note">no grid row</span>')
        body.append("<tr>" + "".join(f"<td>{c}</td>" for c in (
            escape(search.key[2] if search.key else str((search.report.get("defence") or {}).get("name", "?"))),
            grid, _harm(search.worst), _params(search.worst) if search.worst else "no feasible trial",
            _budget(search), _constraints(search), f'<a href="{escape(search.page)}">{escape(search.name)}</a>',
        )) + "</tr>")
    head = "".join(f"<th>{h}</th>" for h in ("defence", "grid worst-case harm", "worst case found by search",
                                            "search's attack", "budget B", "constraints (ε)", "search"))
    return (f"<h3>Worst case found by search under budget B</h3><p class=\"note\">{escape(NOT_COMPARABLE)}</p>"
            f'<table class="searches"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>')


def index_section(groups: dict[tuple[str, str, str], list[Any]], searches: list[Search]) -> dict[tuple, str]:
    """Per ranking group, the search table to show under it; searches matching no group under the key ()."""
    placed: dict[tuple, list[Search]] = {}
    for search in searches:
        group = next((g for g in groups if search.key and (search.key[0], search.key[1], search.key[4]) == g), ())
        placed.setdefault(group, []).append(search)
    return {g: search_table(groups.get(g, []) if g else [], found) for g, found in placed.items()}


def curve_chart(title: str, points: list[dict[str, Any]], x_key: str, x_label: str) -> str:
    """Best feasible harm so far as a step line over a numeric x (trials or training tokens); y in [0, 1]."""
    body, to_y = svg._y_axis(0.0, 1.0)  # noqa: SLF001 - the site's own chart helpers
    xs = [float(p[x_key]) for p in points if isinstance(p.get(x_key), (int, float))] or [0.0]
    low, high = 0.0, max(xs) or 1.0
    plot_w = svg.WIDTH - svg.LEFT - svg.RIGHT

    def to_x(v: float) -> float:
        return svg.LEFT + plot_w * (v - low) / (high - low)

    ticks = [low + (high - low) * i / 4 for i in range(5)]
    if x_key == "trials":  # whole trials: every count when few, else every k-th
        ticks = [float(v) for v in range(0, int(high) + 1, max(1, int(high) // 8 or 1))]
    for v in ticks:
        body.append(svg._text(to_x(v), svg.HEIGHT - svg.BOTTOM + 16, f"{v:,.0f}", text_anchor="middle"))  # noqa: SLF001
    steps, previous = [], None
    for p in points:
        if not isinstance(p.get("best_harm"), (int, float)) or not isinstance(p.get(x_key), (int, float)):
            continue
        x, y = to_x(float(p[x_key])), to_y(float(p["best_harm"]))
        if previous is not None:
            steps.append(f"{x:.1f},{previous:.1f}")
        steps.append(f"{x:.1f},{y:.1f}")
        previous = y
        body.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{svg.PALETTE[0]}"><title>'
                    f"{escape(x_key)} {p[x_key]}: best harm {p['best_harm']:.3f}</title></circle>")
    if len(steps) > 1:
        body.append(f'<polyline points="{" ".join(steps)}" fill="none" stroke="{svg.PALETTE[0]}" stroke-width="2"/>')
    return svg._frame(title, x_label, "best feasible harm so far", body, [("best so far", svg.PALETTE[0])])  # noqa: SLF001


def _json(value: Any) -> str:
    return f"<pre>{escape(json.dumps(value, indent=2, ensure_ascii=False, default=str))}</pre>"


def _table(headers: list[str], rows: list[tuple[str, list[str]]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" for cls, cells in rows)
    return f'<table class="trials"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def search_page(search: Search) -> tuple[str, str]:
    """(title, body) of one search's page: budget, worst case with its full run config, the trials-to-break
    curves, every trial. The site wraps it in its page frame (CSS, Content-Security-Policy)."""
    report, worst = search.report, search.worst
    points = [p for p in report.get("curve") or [] if isinstance(p, dict)]
    rows = []
    for trial in report["trials"]:
        if not isinstance(trial, dict):
            continue
        checks = "<br>".join(
            escape(f"{c.get('constraint')}: {c.get('defended')} → {c.get('attacked')} "
                   f"({'ok' if c.get('ok') else 'broken'})")
            for c in trial.get("constraints") or [] if isinstance(c, dict)) or escape(str(trial.get("error") or "–"))
        status = escape(str(trial.get("status")))
        rows.append(("flagged" if trial.get("status") != "feasible" else "", [
            escape(str(trial.get("number"))), _params(trial), _harm(trial),
            status if trial.get("status") == "feasible" else f'<span class="flag">{status}</span>',
            checks, escape(str(trial.get("train_tokens"))), escape(str(trial.get("run_dir") or "–"))]))
    parts = [
        '<p><a href="index.html">← leaderboard</a></p>',
        f"<h1>Search {escape(search.name)} <small class=\"note\">defence "
        f"{escape(str((report.get('defence') or {}).get('name')))}</small></h1>",
        f"<p>Objective: {escape(str(report.get('objective')))}. Constraints (an attack that breaks one is infeasible "
        f"and never the worst case): {_constraints(search)}. Budget B: {_budget(search)}</p>",
        f'<p class="note">{escape(NOT_COMPARABLE)}</p>',
        "<h2>Worst case found</h2>" + (
            f"<p>Trial {escape(str(worst.get('number')))}: {_params(worst)}, harm {_harm(worst)}</p>"
            + _json(worst.get("config")) if worst else "<p>No feasible trial.</p>"),
        "<h2>Trials to break</h2>",
        curve_chart(f"Best harm so far vs trials: {search.name}", points, "trials", "trials run"),
        curve_chart(f"Best harm so far vs training tokens: {search.name}", points, "train_tokens",
                    "training tokens spent"),
        "<h2>Trials</h2>" + _table(["trial", "attack", "harm [95% CI]", "status", "constraints", "tokens", "run"],
                                   rows),
        "<h2>Search file</h2>" + _json(report.get("search")),
    ]
    return f"Search {search.name}", "\n".join(parts)
