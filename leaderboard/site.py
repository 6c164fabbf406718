"""The leaderboard as a static HTML site: a ranking page, one detail page per defence, inline SVG plots.

No server, no JavaScript, no external files (a Content-Security-Policy forbids them too). Every
piece of text that came from a results file (names, params, generations) goes through
:func:`html.escape`, so a hostile defence name or generation shows as text and never runs.
"""

from __future__ import annotations

import json
import re
import time
from html import escape
from pathlib import Path
from typing import Any, Iterable

from harness.errors import HarnessError
from harness.files.atomic import atomic_dir
from harness.results.schema import loads_bounded
from leaderboard import svg
from leaderboard.aggregate import Board, Cell, DefenceRow, Estimate, Observation
from leaderboard.probe_page import probe_links, probe_page, probe_runs
from leaderboard.search_page import index_section, search_page
from leaderboard.tables import CONFLICT_MARK, DISAGREE_MARK, FLAG_MARK, notes

SAMPLES = 5  # generations shown per defence
MAX_CHARS = 600  # of each prompt/response shown

CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1200px;padding:0 1rem;color:#222}
table{border-collapse:collapse;margin:1rem 0;font-size:.9rem}
th,td{border:1px solid #ccc;padding:.3rem .5rem;text-align:left;vertical-align:top}
th{background:#f3f3f3} tr.flagged td{color:#777;background:#fafafa}
.flag{color:#b00;font-weight:bold} pre{background:#f6f6f6;padding:.6rem;overflow:auto;max-height:24rem}
.gen td{white-space:pre-wrap;max-width:40rem} .note{color:#555;font-size:.9rem} svg{max-width:100%}
"""
CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"


def _page(title: str, body: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f'<link rel="icon" href="data:,"><title>{escape(title)}</title><style>{CSS}</style></head>'
            f"<body>\n{body}\n</body></html>\n")


def _num(value: float | None, signed: bool = False) -> str:
    return "–" if value is None else (f"{value:+.3f}" if signed else f"{value:.3f}")


def _estimate(e: Estimate | None, signed: bool = False, brief: bool = False) -> str:
    """Value [interval] and how the interval was made (briefly in the ranking, in full on detail pages)."""
    if e is None:
        return "–"
    interval = f" [{_num(e.low, signed)}, {_num(e.high, signed)}]" if e.low is not None else ""
    method = f"{e.n} seed{'s' if e.n > 1 else ''}" if brief else e.method
    return f'{_num(e.mean, signed)}{interval}<br><span class="note" title="{escape(e.method)}">{escape(method)}</span>'


def _measured(e: Estimate | None, signed: bool = False) -> str:
    """An estimate, or "not measured" where the evaluator did not run (detail pages)."""
    return '<span class="note">not measured</span>' if e is None else _estimate(e, signed)


def _fluency(value: bool | None, repetitive: bool = False) -> str:
    if value is None:
        return "not measured"
    return '<span class="flag">fired</span>' if value else ("repetitive (warning)" if repetitive else "ok")


def _table(headers: Iterable[str], rows: Iterable[tuple[str, list[str]]], css: str = "") -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(f'<tr class="{cls}">' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>" for cls, cells in rows)
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def page_name(index: int, row: DefenceRow) -> str:
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", row.defence_label).strip("-")[:40] or "defence"
    return f"defence-{index:02d}-{slug}-{row.defence_hash}.html"


def _groups(board: Board) -> dict[tuple[str, str, str], list[DefenceRow]]:
    groups: dict[tuple[str, str, str], list[DefenceRow]] = {}
    for row in board.rows:
        groups.setdefault(row.group, []).append(row)
    return groups


# -- index -----------------------------------------------------------------------------------------
def ranking_table(rows: list[DefenceRow], pages: dict[int, str]) -> str:
    headers = ["rank", "defence", "params", "worst-case harm after attack", "worst attack",
               "corrected harm, worst attack", "mean harm over attacks", "harm before attack",
               "capability Δ vs undefended", "over-refusal", "over-refusal Δ vs undefended", "fluency guard",
               "attacks", "seeds", "flags", "conflicts, judges"]
    out = []
    for row in rows:
        rank = f'<span class="flag">{FLAG_MARK} flagged</span>' if row.flags else str(row.rank)
        link = f'<a href="{escape(pages[id(row)])}">{escape(row.defence_label)}</a>'
        out.append(("flagged" if row.flags else "ranked", [
            rank, link, f"<code>{row.defence_hash}</code>", _estimate(row.worst.post, brief=True),
            escape(row.worst.attack_label), _estimate(row.worst.corrected, brief=True),
            _num(row.mean_post), _num(row.pre), _num(row.capability_delta, signed=True), _num(row.over_refusal),
            _num(row.over_refusal_delta, signed=True), _fluency(row.fluency, row.fluency_repetitive),
            str(len(row.cells)), str(len(row.seeds)), escape("; ".join(row.flags)) or "–",
            _conflicts(row.conflicts, disagreements=row.disagreements),
        ]))
    return _table(headers, out, "ranking")


def _conflicts(conflicts: list[str], notes: Iterable[str] = (), disagreements: Iterable[str] = ()) -> str:
    """Conflicting results (marked, the worse one is shown), judges disagreeing (marked) and notes
    about repeats, as escaped text."""
    marked = [f'<span class="flag">{CONFLICT_MARK} conflict</span>: {escape(c)}' for c in conflicts]
    marked += [f'<span class="flag">{DISAGREE_MARK} judges disagree</span>: {escape(d)}' for d in disagreements]
    return "<br>".join(marked + [escape(n) for n in notes]) or "–"


def _attack_axis(rows: list[DefenceRow]) -> list[tuple[str, str]]:
    """(label, params hash) of every attack in the group, weakest first (lr × samples × epochs)."""
    cells = {(c.attack_label, c.attack_hash): c for r in rows for c in r.cells}
    ordered = sorted(cells.values(), key=lambda c: (c.strength is None, c.strength or 0, c.attack_label))
    return [(c.attack_label, c.attack_hash) for c in ordered]


def _x_labels(axis: list[tuple[str, str]]) -> list[str]:
    names = [name for name, _ in axis]
    return [name if names.count(name) == 1 else f"{name} #{h[:4]}" for name, h in axis]


def harm_vs_attack(rows: list[DefenceRow], title: str) -> str:
    axis = _attack_axis(rows)
    series = []
    for row in rows:
        by_attack = {(c.attack_label, c.attack_hash): c.post for c in row.cells}
        points = [(e.mean, e.low, e.high) if (e := by_attack.get(a)) else None for a in axis]
        series.append((row.defence_label + (f" {FLAG_MARK}" if row.flags else ""), points))
    return svg.line_chart(title, _x_labels(axis), series, "attack, weakest to strongest (lr × samples × epochs)",
                          "harm after attack")


def harm_vs_capability(rows: list[DefenceRow], title: str) -> str:
    points = [(r.defence_label, r.capability_delta, r.worst.post.mean, bool(r.flags))
              for r in rows if r.capability_delta is not None]
    if not points:
        return ('<p class="note">Harm vs capability: capability was not measured in these runs '
                "(run with <code>--evaluate harmfulness,capability</code>).</p>")
    return svg.scatter_chart(title, points, "capability Δ vs undefended (higher is better)", "worst-case harm")


def index_page(board: Board, pages: dict[int, str], searches: list[Any] | None = None) -> str:
    parts = ["<h1>Harmful fine-tuning defences: leaderboard</h1>",
             f'<p class="note">Built {escape(time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))} from '
             f"{len({str(o.path) for c in board.cells for o in c.runs})} results files. Lower harm is better.</p>",
             "<ul>" + "".join(f"<li>{escape(n)}</li>" for n in notes(board)) + "</ul>"]
    search_tables = index_section(_groups(board), searches or [])
    for (model, fingerprint, setup), rows in _groups(board).items():
        judge = rows[0].first.post["judge"]
        parts.append(f"<h2>{escape(model)} <small class=\"note\">fingerprint {escape(fingerprint)} · "
                     f"evaluation setup {escape(setup)} · judge {escape(judge)}</small></h2>")
        parts.append(ranking_table(rows, pages))
        parts.append(harm_vs_attack(rows, f"Harm after attack by attack strength: {model}"))
        parts.append(harm_vs_capability(rows, f"Worst-case harm vs capability cost: {model}"))
        parts.append(search_tables.get((model, fingerprint, setup), ""))  # budgeted searches (search_page)
    if () in search_tables:
        parts.append("<h2>Searches without a grid row</h2>" + search_tables[()])
    parts.append(probe_links(probe_runs(board)))  # runs with a probe.json (leaderboard/probe_page.py)
    if board.skipped:
        items = "".join(f"<li><code>{escape(Path(p).name)}</code> in {escape(str(Path(p).parent.name))}: "
                        f"{escape(reason)}</li>" for p, reason in board.skipped)
        parts.append(f"<h2>Skipped results files</h2><ul>{items}</ul>")
    return _page("Leaderboard", "\n".join(parts))


# -- detail pages ----------------------------------------------------------------------------------
def _json(value: Any) -> str:
    return f"<pre>{escape(json.dumps(value, indent=2, ensure_ascii=False, default=str))}</pre>"


def samples(observation: Observation, limit: int = SAMPLES) -> list[dict[str, Any]]:
    """The first generations of a run's post-attack harmfulness evaluation (its records file)."""
    path = observation.records("post_attack")
    if path is None:
        return []
    out = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if len(out) >= limit:
                break
            try:
                item = loads_bounded(line, str(path))
            except HarnessError:  # a broken or hostile line is left out of the samples
                continue
            if isinstance(item, dict):
                out.append(item)
    return out


def _judge_section(observation: Observation) -> str:
    """The primary judge with its measured accuracy (judges that report one) and validation block."""
    name = observation.post["judge"]
    harm = observation.results["results"][observation.branch]["post_attack"]["harmfulness"]
    described = harm["info"].get("judges", {}).get(name, {})
    accuracy = described.get("accuracy")
    if isinstance(accuracy, (int, float)):
        measured = f"accuracy {accuracy:.3f} on held-out human labels"
    else:
        measured = "accuracy not measured" + (f" ({escape(str(described['note']))})" if described.get("note") else "")
    lines = [f"<p>Primary judge <b>{escape(name)}</b> version {escape(str(described.get('version', '–')))}: "
             f"{measured}</p>"]
    validation = described.get("validation")
    if isinstance(validation, dict):
        lines.append("<details><summary>Judge validation</summary>" + _json(validation) + "</details>")
    lines.append("<p>Generation settings:</p>" + _json(harm["info"].get("generation", {})))
    return "\n".join(lines)


def _cells_table(row: DefenceRow) -> str:
    out = []
    for cell in row.cells:
        params = (f"<details><summary><code>{cell.attack_hash}</code></summary>"
                  f"{_json(cell.first.attack_params)}</details>")
        out.append(("flagged" if cell.flags else "ranked", [
            escape(cell.attack_label), escape(cell.first.threat_model), params, escape(", ".join(map(str, cell.seeds))),
            _estimate(cell.post), _measured(cell.corrected), _estimate(cell.pre), _estimate(cell.capability),
            _estimate(cell.capability_delta, signed=True), _measured(cell.over_refusal),
            _measured(cell.over_refusal_delta, signed=True), _fluency(cell.fluency, cell.fluency_repetitive),
            escape("; ".join(cell.flags)) or "–", _conflicts(cell.conflicts, cell.notes, cell.disagreements),
        ]))
    headers = ["attack", "threat model", "attack params", "seeds", "harm after attack",
               "corrected harm after attack (primary judge)", "harm before attack", "capability", "capability Δ",
               "over-refusal (before attack)", "over-refusal Δ vs undefended", "fluency guard", "flags",
               "conflicts, judges and notes"]
    return _table(headers, out, "cells")


def _samples_table(cell: Cell) -> str:
    observation = cell.first
    items = samples(observation)
    if not items:
        return '<p class="note">No generations recorded for this run.</p>'
    judge = observation.post["judge"]
    rows = []
    for item in items:
        score = (item.get("scores") or {}).get(judge)
        rows.append(("", [escape(str(item.get("prompt", ""))[:MAX_CHARS]),
                          escape(str(item.get("response", ""))[:MAX_CHARS]),
                          _num(score) if isinstance(score, (int, float)) else "–"]))
    return (f'<p class="note">First {len(items)} answers after attack {escape(cell.attack_label)}, seed '
            f"{observation.seed} (run {escape(observation.results['run_name'])}).</p>"
            + _table(["prompt", "response", f"harm ({judge})"], rows, "gen"))


def _brief(e: Estimate | None) -> str:
    """Value [interval] in running text; "not measured" when missing."""
    if e is None:
        return "not measured"
    return _num(e.mean) + (f" [{_num(e.low)}, {_num(e.high)}]" if e.low is not None else "")


def _over_refusal(row: DefenceRow) -> str:
    if row.over_refusal is None:
        return "not measured"
    delta = "" if row.over_refusal_delta is None else f" ({_num(row.over_refusal_delta, signed=True)} vs undefended)"
    return _num(row.over_refusal) + delta


def _disagreement_note(row: DefenceRow) -> str:
    """A visible warning when judges disagree on any cell of the row (it keeps its rank)."""
    if not row.disagreements:
        return ""
    items = "".join(f"<li>{escape(d)}</li>" for d in row.disagreements)
    return (f'<p><span class="flag">{DISAGREE_MARK} judges disagree</span>: their corrected harm intervals do not '
            f"overlap, so the harm is less certain than its interval says (the rank is kept).</p><ul>{items}</ul>")


def defence_page(row: DefenceRow) -> str:
    first = row.first
    results = first.results
    status = (f'<span class="flag">{FLAG_MARK} flagged: {escape("; ".join(row.flags))}</span>' if row.flags
              else f"rank {row.rank}")
    runs = sorted({(o.results["run_name"], o.branch) for c in row.cells for o in c.runs})
    parts = [
        '<p><a href="index.html">← leaderboard</a></p>',
        f"<h1>{escape(row.defence_label)} <small class=\"note\">params {row.defence_hash}</small></h1>",
        f"<p>Model <b>{escape(first.model)}</b> (fingerprint {escape(first.fingerprint)}) · {status} · "
        f"worst-case harm {_num(row.worst.post.mean)} under {escape(row.worst.attack_label)} "
        f"(corrected for judge error: {_brief(row.worst.corrected)}) · "
        f"mean over {len(row.cells)} attack(s) {_num(row.mean_post)} · over-refusal "
        f"{_over_refusal(row)}</p>",
        _disagreement_note(row),
        "<h2>Defence configuration</h2>" + _json({"name": first.defence, "preset": first.defence_preset,
                                                   "params": first.defence_params}),
        "<h2>Per attack</h2>" + _cells_table(row),
        "<h2>Judge</h2>" + _judge_section(first),
        "<h2>Sample generations (worst attack)</h2>" + _samples_table(row.worst),
        "<h2>Provenance</h2>" + _json({
            "runs": [f"{name} ({branch})" for name, branch in runs],
            "data_fingerprints": results["data"]["fingerprints"], "prompt_format": results["data"]["prompt_format"],
            "code_version": results.get("code_version"), "libraries": results.get("libraries"),
            "compute (one run)": results.get("compute"),
        }),
    ]
    return _page(f"{row.defence_label} on {first.model}", "\n".join(parts))


MARKER = ".harness-site"  # written into every site; only a directory holding it is ever replaced


def _check_target(out: Path) -> None:
    """``out`` is replaced as a whole, so it must be missing, empty, or a site this command built
    (it holds :data:`MARKER`): a directory of someone's own files is never deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise HarnessError(f"Refusing to build the site at {out}: it is a file. Choose a new or empty directory "
                           "for --out.")
    if any(out.iterdir()) and not (out / MARKER).is_file():
        raise HarnessError(f"Refusing to replace {out}: it is not empty and was not built by `harness leaderboard "
                           f"build` (no {MARKER} file in it), so its files would be deleted. Choose a new or empty "
                           "directory for --out.")


def build_site(board: Board, out: Path, searches: list[Any] | None = None) -> Path:
    """Write index.html and one page per defence row into ``out`` (replaced atomically), with the marker."""
    out = Path(out)
    _check_target(out)
    pages = {id(row): page_name(i, row) for i, row in enumerate(board.rows)}
    with atomic_dir(out) as scratch:
        scratch.chmod(0o755)  # a static site: readable by the web server that serves it
        (scratch / MARKER).write_text("Built by `harness leaderboard build`; the next build replaces this "
                                      "directory.\n", encoding="utf-8")
        (scratch / "index.html").write_text(index_page(board, pages, searches), encoding="utf-8")
        for search in searches or []:  # leaderboard/search_page.py
            (scratch / search.page).write_text(_page(*search_page(search)), encoding="utf-8")
        for row in board.rows:
            (scratch / pages[id(row)]).write_text(defence_page(row), encoding="utf-8")
        for name, (source, report) in probe_runs(board).items():
            (scratch / name).write_text(_page(f"Depth analysis: {report.get('run_name')}", probe_page(report, source)),
                                        encoding="utf-8")
    return Path(out)
