"""The Table-1-shaped matrix of a sweep: rows defences, columns attacks, cells harmfulness.

Each cell is the primary judge's mean harmfulness after the attack, averaged over seeds (with a
Student-t 95% interval when there are several seeds), and beside it the capability delta of the
same model against the undefended reference under the same attack (when a capability-type
evaluator ran). The first column is harmfulness before any attack, with the defence's own
capability cost. When the ``over-refusal`` evaluator ran, each cell also shows the model's refusal
rate on benign prompts (``refuses``), so a defence that refuses everything cannot pass for a safe one.
"""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Table

from harness.results.stats import t_interval

PRE = "pre-attack"
CAPABILITY_EVALUATORS = ("capability",)  # headline deltas shown beside harm (higher is better)
OVER_REFUSAL = "over-refusal"  # its headline (refusal rate on benign prompts) is shown beside harm


def _capability(phase: dict[str, Any]) -> float | None:
    for name in CAPABILITY_EVALUATORS:
        value = phase["headlines"].get(name, {}).get("value")
        if value is not None:
            return value
    return None


def _cell_values(results: dict[str, Any], phase: str) -> tuple[float | None, float | None, float | None]:
    """(harm, capability delta vs the undefended branch, over-refusal rate) of one run in one phase,
    from its summary block."""
    branches = results["summary"]["branches"]
    defended = branches["defended"][phase]
    reference = branches.get("undefended", branches["defended"])[phase]  # `none` is its own reference
    harm = defended["harmfulness"]["mean"] if defended["harmfulness"] else None
    mine, theirs = _capability(defended), _capability(reference)
    delta = mine - theirs if mine is not None and theirs is not None else None
    return harm, delta, defended["headlines"].get(OVER_REFUSAL, {}).get("value")


def _summary(values: list[float]) -> dict[str, Any] | None:
    if not values:
        return None
    mean, lo, hi = t_interval(values)
    return {"mean": mean, "ci95": [lo, hi], "n_seeds": len(values), "values": values}


def sweep_matrix(cells: Sequence[Any], results: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Aggregate cell results (None for a failed cell) into the matrix, seeds averaged."""
    defences = list(dict.fromkeys(c.defence for c in cells))
    attacks = list(dict.fromkeys(c.attack for c in cells))
    harm: dict[tuple[str, str], dict[int, float]] = {}
    capability: dict[tuple[str, str], dict[int, float]] = {}
    refusal: dict[tuple[str, str], dict[int, float]] = {}
    judges: set[str] = set()
    for cell, result in zip(cells, results):
        if result is None:
            continue
        for column, phase in ((PRE, "pre_attack"), (cell.attack, "post_attack")):
            value, delta, refuses = _cell_values(result, phase)
            if value is not None:  # pre-attack repeats across attacks: one value per seed
                harm.setdefault((cell.defence, column), {})[cell.seed] = value
            if delta is not None:
                capability.setdefault((cell.defence, column), {})[cell.seed] = delta
            if refuses is not None:
                refusal.setdefault((cell.defence, column), {})[cell.seed] = refuses
        harm_block = result["summary"]["branches"]["defended"]["post_attack"]["harmfulness"]
        if harm_block:
            judges.add(harm_block["judge"])
    columns = [PRE, *attacks]
    return {
        "defences": defences,
        "columns": columns,
        "judge": ", ".join(sorted(judges)) or None,
        "seeds": sorted({c.seed for c in cells}),
        "cells": {
            d: {col: {"harm": _summary(list(harm.get((d, col), {}).values())),
                      "capability_delta": _summary(list(capability.get((d, col), {}).values())),
                      "over_refusal": _summary(list(refusal.get((d, col), {}).values()))}
                for col in columns}
            for d in defences
        },
        "interval": "Student-t 95% over seeds (zero width for one seed)",
    }


def _cell_text(cell: dict[str, Any]) -> str:
    harm = cell["harm"]
    if harm is None:
        return "–"
    text = f"{harm['mean']:.2f}"
    if harm["n_seeds"] > 1:
        text += f" ±{harm['ci95'][1] - harm['mean']:.2f}"
    notes = []
    if cell["capability_delta"] is not None:
        notes.append(f"Δcap {cell['capability_delta']['mean']:+.2f}")
    if cell.get("over_refusal") is not None:
        notes.append(f"refuses {cell['over_refusal']['mean']:.2f}")
    return text + (f" ({', '.join(notes)})" if notes else "")


def sweep_table(matrix: dict[str, Any]) -> Table:
    seeds = ", ".join(map(str, matrix["seeds"]))
    table = Table(title=f"Harmfulness ({matrix['judge']}; mean over seeds {seeds}; lower is better)")
    table.add_column("defence", style="bold")
    for column in matrix["columns"]:
        table.add_column(column, justify="right")
    for defence in matrix["defences"]:
        table.add_row(defence, *[_cell_text(matrix["cells"][defence][c]) for c in matrix["columns"]])
    return table


def render_markdown(matrix: dict[str, Any]) -> str:
    header = ["defence", *matrix["columns"]]
    lines = [
        f"Harmfulness after the attack (judge: {matrix['judge']}; seeds {', '.join(map(str, matrix['seeds']))}; "
        f"{matrix['interval']}; Δcap: capability vs the undefended model under the same attack; refuses: "
        "refusal rate on benign prompts, when over-refusal ran).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for defence in matrix["defences"]:
        cells = [_cell_text(matrix["cells"][defence][c]) for c in matrix["columns"]]
        lines.append("| " + " | ".join([defence.replace("|", "\\|"), *cells]) + " |")
    return "\n".join(lines) + "\n"
