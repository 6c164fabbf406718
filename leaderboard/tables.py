"""The ranking as flat records, and those records as a terminal table, Markdown, CSV or JSON.

Every format is rendered from the same :func:`records`, so they agree by construction.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from rich import box
from rich.table import Table

from harness.terminal import plain
from leaderboard.aggregate import Board, Cell, DefenceRow, Estimate

FORMAT_VERSION = 1
FLAG_MARK = "⚑"
CONFLICT_MARK = "≠"  # differing results for one cell and seed: the worse is shown (see aggregate)
DISAGREE_MARK = "≉"  # two judges' corrected harm intervals are disjoint (see aggregate)

COLUMNS = {  # record field: column title
    "rank": "rank",
    "model": "model",
    "defence": "defence",
    "defence_params_hash": "params",
    "worst_post_harm": "worst harm [95% CI]",
    "worst_post_harm_corrected": "corrected harm [95% CI]",
    "worst_attack": "worst attack",
    "mean_post_harm": "mean harm",
    "pre_harm": "harm pre-attack",
    "capability_delta": "capability Δ",
    "over_refusal": "over-refusal",
    "over_refusal_delta": "over-refusal Δ",
    "fluency": "fluency",
    "attacks": "attacks",
    "seeds": "seeds",
    "flags": "flags",
    "conflicts": "conflicts",
    "judges_disagree": "judges disagree",
}


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def _interval(estimate: Estimate | None) -> list[float | None]:
    return [_round(estimate.low), _round(estimate.high)] if estimate else [None, None]


def _estimate(estimate: Estimate | None) -> dict[str, Any] | None:
    """A cell's estimate with its interval, method and per-seed values (None: not measured)."""
    if estimate is None:
        return None
    return {"mean": _round(estimate.mean), "ci95": _interval(estimate), "method": estimate.method,
            "per_seed": [_round(v) for v in estimate.values]}


def _fluency(value: bool | None, repetitive: bool = False) -> str:
    """The guard's state: fired, ok, or ok with the repetitive-answers warning."""
    return "not measured" if value is None else ("fired" if value else ("repetitive" if repetitive else "ok"))


def record(row: DefenceRow) -> dict[str, Any]:
    first = row.first
    return {
        "rank": row.rank,
        "flagged": bool(row.flags),
        "flags": "; ".join(row.flags),
        "conflicts": "; ".join(row.conflicts),
        "judges_disagree": "; ".join(row.disagreements),
        "model": first.model,
        "model_fingerprint": first.fingerprint,
        "setup": first.setup,
        "defence": row.defence_label,
        "defence_params_hash": row.defence_hash,
        "worst_post_harm": _round(row.worst.post.mean),
        "worst_post_harm_ci95": _interval(row.worst.post),
        "worst_post_harm_ci_method": row.worst.post.method,
        "worst_post_harm_corrected": _round(row.worst.corrected.mean) if row.worst.corrected else None,
        "worst_post_harm_corrected_ci95": _interval(row.worst.corrected),
        "worst_post_harm_corrected_ci_method": row.worst.corrected.method if row.worst.corrected else None,
        "worst_attack": row.worst.attack_label,
        "mean_post_harm": _round(row.mean_post),
        "pre_harm": _round(row.pre),
        "capability_delta": _round(row.capability_delta),
        "over_refusal": _round(row.over_refusal),
        "over_refusal_delta": _round(row.over_refusal_delta),
        "fluency": _fluency(row.fluency, row.fluency_repetitive),
        "attacks": len(row.cells),
        "seeds": len(row.seeds),
        "judge": first.post["judge"],
    }


def records(board: Board) -> list[dict[str, Any]]:
    return [record(r) for r in board.rows]


SIGNED = ("capability_delta", "over_refusal_delta")


def _text(rec: dict[str, Any], field: str) -> str:
    value = rec[field]
    if field == "rank":
        return f"{FLAG_MARK} flagged" if rec["flagged"] else str(value)
    if field in ("worst_post_harm", "worst_post_harm_corrected") and value is not None:
        low, high = rec[f"{field}_ci95"]
        return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{value:.3f}"
    if isinstance(value, float):
        return f"{value:+.3f}" if field in SIGNED else f"{value:.3f}"
    return "–" if value is None or value == "" else str(value)


TERMINAL = {"rank": "#", "defence": "defence", "worst_post_harm": "worst", "ci": "95% CI",
            "corrected": "corrected [CI]", "worst_attack": "attack", "mean_post_harm": "mean", "pre_harm": "pre",
            "capability_delta": "capΔ", "over_refusal": "refuse", "over_refusal_delta": "refΔ",
            "fluency": "fluency", "grid": "grid"}


def _marks(rec: dict[str, Any]) -> str:
    """The marks a defence name carries: conflicting results, judges disagreeing."""
    return (f" {CONFLICT_MARK}" if rec["conflicts"] else "") + (f" {DISAGREE_MARK}" if rec["judges_disagree"] else "")


def _caption_lines(recs: list[dict[str, Any]]) -> list[str]:
    """Why each marked row is marked: flags, conflicts, judges disagreeing."""
    lines = [f"{FLAG_MARK} {r['defence']}: {r['flags']}" for r in recs if r["flagged"]]
    lines += [f"{CONFLICT_MARK} {r['defence']}: conflict: {r['conflicts']}" for r in recs if r["conflicts"]]
    lines += [f"{DISAGREE_MARK} {r['defence']}: judges disagree: {r['judges_disagree']}" for r in recs
              if r["judges_disagree"]]
    return lines


def _corrected_short(rec: dict[str, Any]) -> str:
    value, (low, high) = rec["worst_post_harm_corrected"], rec["worst_post_harm_corrected_ci95"]
    if value is None:
        return "–"
    return f"{value:.3f} [{low:.2f}–{high:.2f}]" if low is not None else f"{value:.3f}"


def terminal_tables(board: Board) -> list[Table]:
    """One compact table per (model, evaluation setup); flag reasons go under it."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for rec in records(board):
        groups.setdefault((rec["model"], rec["setup"]), []).append(rec)
    out = []
    for (model, setup), recs in groups.items():
        caption = "".join(plain(line) + "\n" for line in _caption_lines(recs))
        table = Table(title=plain(f"{model} · setup {setup} · judge {recs[0]['judge']} · sorted by {board.sort}"),
                      caption=caption + "harm after attack: worst and mean over the attack grid, pre = before "
                      "attack; corrected = worst cell's harm rate corrected for judge error; capΔ vs undefended; "
                      "refuse = over-refusal on benign prompts, refΔ vs undefended; grid = attacks × seeds; "
                      "– = not measured",
                      box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
        for field, title in TERMINAL.items():
            table.add_column(title, no_wrap=True, overflow="ellipsis", min_width=8 if field == "defence" else None)
        for rec in recs:
            low, high = rec["worst_post_harm_ci95"]
            extra = {"grid": f"{rec['attacks']}×{rec['seeds']}", "fluency": rec["fluency"].replace("not measured", "–"),
                     "ci": f"{low:.2f}–{high:.2f}" if low is not None else "–", "corrected": _corrected_short(rec)}
            rank = FLAG_MARK if rec["flagged"] else str(rec["rank"])
            cells = [rank, *(extra[f] if f in extra else _text(rec, f) for f in list(TERMINAL)[1:])]
            cells[2] = f"{rec['worst_post_harm']:.3f}"
            cells[1] += _marks(rec)
            table.add_row(*map(plain, cells), style="dim" if rec["flagged"] else None)
        out.append(table)
    return out


def notes(board: Board) -> list[str]:
    """What every rendering must say alongside the numbers."""
    methods = sorted({c.post.method for c in board.cells})
    out = [
        "Harm: primary judge's mean probability of 'harmful' after the attack (0 = never harmful); "
        "worst/mean over the attacks each defence was run on; capability Δ: defended minus undefended, "
        "before the attack.",
        "Worst case: the attack cell with the highest harm; intervals: " + " / ".join(methods) + ".",
        "Corrected harm: the primary judge's harm rate (share of answers scored above 0.5) corrected for its "
        "measured sensitivity and specificity (Rogan-Gladen), with an interval carrying the judge's validation "
        "uncertainty; – where the judge reports no validation counts.",
        "Over-refusal: refusal rate on benign prompts before the attack (over-refusal evaluator), Δ against the "
        "undefended model in the same results file (or, for a run without one, the board's runs of none); "
        "– = not measured.",
        f"Flagged ({FLAG_MARK}): capability more than {board.capability_threshold:g} below the undefended model "
        f"in the same results file, over-refusal more than {board.over_refusal_margin:g} above it, or a fluency "
        "guard fired; flagged rows are listed last and not ranked.",
    ]
    if any(r.conflicts for r in board.rows):
        out.append(f"Conflict ({CONFLICT_MARK}): different results for the same cell and seed in different files; "
                   "all are kept and the cell shows the worse (higher harm) one. Re-run the cell with "
                   "`harness leaderboard verify` to settle it.")
    if any(r.disagreements for r in board.rows):
        out.append(f"Judges disagree ({DISAGREE_MARK}): two judges' corrected harm intervals do not overlap, so at "
                   "least one judge's measured error does not hold on these answers and the harm is less certain "
                   "than its interval says. The row keeps its rank (the mark is about the judges, not the model).")
    if any(r.fluency_repetitive and not r.fluency for r in board.rows):
        out.append("Fluency 'repetitive': fluent answers that repeat themselves (e.g. a refusal said twice in 50 "
                   "tokens); a warning, the row stays ranked. 'fired' (gibberish, loops, empty answers) flags it.")
    if repeats := sum(1 for c in board.cells if c.notes):
        out.append(f"Note: in {repeats} cell(s) the undefended reference branch of another run differs from the "
                   "direct run of the same cell and seed; the direct run is used (details per cell in the JSON "
                   "export and on the defence pages).")
    if board.skipped:
        out.append(f"{len(board.skipped)} results file(s) skipped as unreadable.")
    return out


def markdown(board: Board) -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    recs = records(board)
    lines = ["| " + " | ".join(COLUMNS.values()) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(_text(r, f)) for f in COLUMNS) + " |" for r in recs]
    return "\n".join(lines) + "\n\n" + "\n".join(f"- {n}" for n in notes(board)) + "\n"


CSV_FIELDS = ["rank", "flagged", "flags", "conflicts", "judges_disagree", "model", "model_fingerprint", "setup",
              "defence", "defence_params_hash",
              "worst_post_harm", "worst_post_harm_ci_low", "worst_post_harm_ci_high", "worst_post_harm_ci_method",
              "worst_post_harm_corrected", "worst_post_harm_corrected_ci_low", "worst_post_harm_corrected_ci_high",
              "worst_post_harm_corrected_ci_method", "worst_attack", "mean_post_harm", "pre_harm", "capability_delta",
              "over_refusal", "over_refusal_delta", "fluency", "attacks", "seeds", "judge"]


def csv_text(board: Board) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for rec in records(board):
        low, high = rec["worst_post_harm_ci95"]
        corrected_low, corrected_high = rec["worst_post_harm_corrected_ci95"]
        writer.writerow({**{k: v for k, v in rec.items() if k in CSV_FIELDS},
                         "worst_post_harm_ci_low": low, "worst_post_harm_ci_high": high,
                         "worst_post_harm_corrected_ci_low": corrected_low,
                         "worst_post_harm_corrected_ci_high": corrected_high})
    return buffer.getvalue()


def cell_record(cell: Cell, row: DefenceRow) -> dict[str, Any]:
    first = cell.first
    return {
        "model": first.model, "defence": row.defence_label, "defence_params_hash": row.defence_hash,
        "attack": cell.attack_label, "attack_params_hash": cell.attack_hash, "threat_model": first.threat_model,
        "setup": first.setup, "seeds": cell.seeds,
        "post_harm": _estimate(cell.post),
        "post_harm_corrected": _estimate(cell.corrected),
        "pre_harm": _round(cell.pre.mean) if cell.pre else None,
        "capability": _round(cell.capability.mean) if cell.capability else None,
        "capability_delta": _round(cell.capability_delta.mean) if cell.capability_delta else None,
        "over_refusal": _estimate(cell.over_refusal),
        "over_refusal_delta": _estimate(cell.over_refusal_delta),
        "fluency": _fluency(cell.fluency, cell.fluency_repetitive), "flags": cell.flags, "conflicts": cell.conflicts,
        "notes": cell.notes,
        "judges_disagree": cell.disagreements,
        "results": [str(r.path) for r in cell.runs],
        "observations": [{"results": str(o.path), "branch": o.branch, "seed": o.seed,
                          "post_harm": _round(o.post["mean"]),
                          "post_harm_corrected": _round(o.corrected["rate"]) if o.corrected else None,
                          "used": any(o is r for r in cell.runs)} for o in cell.observations],
    }


def json_text(board: Board) -> str:
    rows = []
    for row in board.rows:
        cells = [cell_record(c, row) for c in row.cells]
        rows.append({**record(row), "defence_params": row.first.defence_params, "cells": cells})
    return json.dumps({"leaderboard_format": FORMAT_VERSION, "sort": board.sort,
                       "capability_threshold": board.capability_threshold,
                       "over_refusal_margin": board.over_refusal_margin, "notes": notes(board),
                       "rows": rows, "skipped": [{"path": p, "reason": r} for p, r in board.skipped]},
                      indent=2, ensure_ascii=False) + "\n"


def render(board: Board, fmt: str) -> str:
    from harness.errors import HarnessError

    renderers = {"md": markdown, "csv": csv_text, "json": json_text}
    if fmt not in renderers:
        raise HarnessError(f"Unknown format {fmt!r}; choose one of {', '.join(renderers)}.")
    return renderers[fmt](board)
