"""probe.json on the terminal: one row per layer, one sparkline per curve, the tests with their p-values."""

from __future__ import annotations

from typing import Any, Sequence

from rich.table import Table

from harness.terminal import plain

BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None]) -> str:
    """One block character per value, scaled between the curve's own min and max (· for a missing value)."""
    present = [v for v in values if v is not None]
    if not present:
        return ""
    low, high = min(present), max(present)
    span = (high - low) or 1.0
    return "".join("·" if v is None else BLOCKS[round((v - low) / span * (len(BLOCKS) - 1))] for v in values)


def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table(title: str, report: dict[str, Any], columns: dict[str, list[str]]) -> Table:
    table = Table(title=plain(title))
    table.add_column("layer", justify="right")
    for name in columns:
        table.add_column(plain(name), justify="right")
    for row, layer in enumerate(report["layers"]):
        table.add_row(str(layer), *(plain(cells[row]) for cells in columns.values()))
    return table


def layer_tables(report: dict[str, Any]) -> list[Table]:
    """Probe accuracy, logit lens, MMD to noise (one column per stage) and weight change (one per pair)."""
    stages = report["stages"]
    seeds = len(next(iter(stages.values()))["probe_accuracy"]["seeds"])
    accuracy = {label: [f"{_num(m)} [{_num(lo, 2)}, {_num(hi, 2)}]" for m, lo, hi in
                        zip(b["probe_accuracy"]["mean"], b["probe_accuracy"]["low"], b["probe_accuracy"]["high"])]
                for label, b in stages.items()}
    lens = {label: [f"{_num(h)} / {_num(n)}" for h, n in
                    zip(b["lens_logprob"]["harmful"], b["lens_logprob"]["harmless"])] for label, b in stages.items()}
    noise = {label: [_num(v) for v in b["mmd_noise"]["mean"]] for label, b in stages.items()}
    weights = {pair: [_num(v, 4) for v in c["absolute"]] for pair, c in report["weight_change"].items()}
    head = f"{report['model']} · {report['defence']} → {report['attack']} · seed {report['seed']}"
    tables = [
        _table(f"Linear-probe accuracy, harmful vs harmless prompts (mean [95% CI] over {seeds} seeds; chance 0.5) · "
               f"{head}", report, accuracy),
        _table("Logit lens: mean log-probability per token of harmful / harmless continuations", report, lens),
        _table("MMD of harmful MLP outputs to Gaussian noise (0 = embeddings: no MLP)", report, noise),
    ]
    if weights:
        tables.append(_table("Weight change ||W_after - W_before||_2 (0 = embeddings)", report, weights))
    return tables


def curve_lines(report: dict[str, Any]) -> list[str]:
    """Plain text lines (escape before printing with markup): one sparkline per stage and curve."""
    lines = []
    for label, block in report["stages"].items():
        lines.append(f"{label:>28}  probe acc    {sparkline(block['probe_accuracy']['mean'])}")
        lines.append(f"{'':>28}  lens harmful {sparkline(block['lens_logprob']['harmful'])}")
        lines.append(f"{'':>28}  MMD to noise {sparkline(block['mmd_noise']['mean'])}")
    for pair, change in report["weight_change"].items():
        lines.append(f"{pair:>28}  Δweights     {sparkline(change['absolute'])}")
    for test in report["tests"]:
        lines.append(f"test: {test['claim']} ({test['after']} vs {test['before']}): mean Δ accuracy "
                     f"{test['mean_difference']:+.4f}, p = {test['p_value']:.4f} ({test['method']})")
    return lines
