"""Site pages for ``harness probe``: one page per run that has a probe.json beside its results.json.

probe.json is read like every file from outside: size- and depth-bounded, every number coerced (anything
that is not a finite number shows as a gap), every label escaped, lengths capped. Plots are inline SVG
with a y-axis fitted to the data (log-probabilities are negative, MMD and weight change unbounded).
"""

from __future__ import annotations

import math
import re
from html import escape
from pathlib import Path
from typing import Any, Sequence

from harness.errors import HarnessError
from harness.files.hashing import stable_hash
from harness.results.schema import loads_bounded
from leaderboard import svg
from leaderboard.aggregate import Board

PROBE_FILE = "probe.json"
MAX_LAYERS, MAX_SERIES = 512, 8


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _numbers(value: Any, n: int) -> list[float | None]:
    items = value if isinstance(value, list) else []
    return [_number(items[i]) if i < len(items) else None for i in range(n)]


def _get(block: Any, *path: str) -> Any:
    for key in path:
        block = block.get(key) if isinstance(block, dict) else None
    return block


def read_probe(path: Path) -> dict[str, Any] | None:
    """A probe.json as a dict, or None if it is missing or unreadable (a broken file is left out of the site)."""
    try:
        report = loads_bounded(path.read_bytes(), str(path))
    except (OSError, HarnessError):
        return None
    return report if isinstance(report, dict) and report.get("kind") == "harness-probe" else None


def probe_runs(board: Board) -> dict[str, tuple[Path, dict[str, Any]]]:
    """Page name → (probe.json path, report) for every run on the board that has one."""
    found = {}
    for path in sorted({o.path.parent / PROBE_FILE for c in board.cells for o in c.observations or c.runs}):
        report = read_probe(path) if path.is_file() else None
        if report is not None:
            slug = re.sub(r"[^A-Za-z0-9_-]+", "-", str(report.get("run_name") or path.parent.name)).strip("-")[:60]
            found[f"probe-{slug or 'run'}-{stable_hash(str(path), 8)}.html"] = (path, report)
    return found


def curve_chart(title: str, layers: Sequence[str], series: Sequence[tuple[str, Sequence[float | None]]],
                y_label: str) -> str:
    """One line per series over the layers, y fitted to the values."""
    values = [v for _, points in series for v in points if v is not None]
    if not values:
        return f'<p class="note">{escape(title)}: no values.</p>'
    low, high = min(values), max(values)
    pad = (high - low) * 0.08 or abs(high) * 0.05 or 0.5
    low, high = low - pad, high + pad
    plot_w, plot_h = svg.WIDTH - svg.LEFT - svg.RIGHT, svg.HEIGHT - svg.TOP - svg.BOTTOM
    step = plot_w / max(len(layers), 1)

    def to_x(i: int) -> float:
        return svg.LEFT + step * (i + 0.5)

    def to_y(v: float) -> float:
        return svg.TOP + plot_h * (1 - (v - low) / (high - low))

    digits = min(6, max(0, 1 - math.floor(math.log10((high - low) / 5))))  # enough to tell the ticks apart
    body = []
    for i in range(6):
        v = low + (high - low) * i / 5
        body.append(f'<line x1="{svg.LEFT}" x2="{svg.WIDTH - svg.RIGHT}" y1="{to_y(v):.1f}" y2="{to_y(v):.1f}" '
                    'stroke="#eee"/>')
        body.append(svg._text(svg.LEFT - 6, to_y(v) + 4, f"{v:.{digits}f}", text_anchor="end"))
    every = max(1, math.ceil(len(layers) / 16))
    for i, name in enumerate(layers):
        if i % every == 0:
            body.append(svg._text(to_x(i), svg.HEIGHT - svg.BOTTOM + 16, name, text_anchor="middle"))
    legend = []
    for s, (name, points) in enumerate(series[:MAX_SERIES]):
        colour = svg.PALETTE[s % len(svg.PALETTE)]
        legend.append((name, colour))
        coords = [(to_x(i), v) for i, v in enumerate(points) if v is not None]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{to_y(v):.1f}" for x, v in coords)
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, v in coords:
            body.append(f'<circle cx="{x:.1f}" cy="{to_y(v):.1f}" r="3" fill="{colour}">'
                        f"<title>{escape(name)}: {v:.4g}</title></circle>")
    return svg._frame(title, "layer (0 = embeddings)", y_label, body, legend)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def probe_page(report: dict[str, Any], source: Path) -> str:
    """The body of one run's probe page (escaped HTML)."""
    raw_layers = report.get("layers") if isinstance(report.get("layers"), list) else []
    layers = [str(int(v)) if (v := _number(x)) is not None else "?" for x in raw_layers[:MAX_LAYERS]]
    n = len(layers)
    stages = report.get("stages") if isinstance(report.get("stages"), dict) else {}
    stages = dict(list(stages.items())[:MAX_SERIES])
    changes = report.get("weight_change") if isinstance(report.get("weight_change"), dict) else {}
    changes = dict(list(changes.items())[:MAX_SERIES])
    title = f"{report.get('model', '?')} · {report.get('defence', '?')} → {report.get('attack', '?')}"
    accuracy = [(str(k), _numbers(_get(b, "probe_accuracy", "mean"), n)) for k, b in stages.items()]
    harmful = [(f"{k} harmful", _numbers(_get(b, "lens_logprob", "harmful"), n)) for k, b in stages.items()]
    harmless = [(f"{k} harmless", _numbers(_get(b, "lens_logprob", "harmless"), n)) for k, b in stages.items()]
    noise = [(str(k), _numbers(_get(b, "mmd_noise", "mean"), n)) for k, b in stages.items()]
    weights = [(str(k), _numbers(_get(c, "absolute"), n)) for k, c in changes.items()]
    rows = []
    for test in report.get("tests") if isinstance(report.get("tests"), list) else []:
        if isinstance(test, dict):
            rows.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in (
                escape(str(test.get("claim", ""))), escape(f"{test.get('after')} vs {test.get('before')}"),
                _fmt(_number(test.get("mean_difference")), 4), _fmt(_number(test.get("p_value")), 4),
                escape(str(test.get("method", ""))))) + "</tr>")
    table = ("<table><thead><tr><th>claim</th><th>stages</th><th>mean Δ accuracy</th><th>p-value</th><th>method</th>"
             f"</tr></thead><tbody>{''.join(rows)}</tbody></table>") if rows else '<p class="note">No tests.</p>'
    columns = ([(f"probe acc · {k}", v) for k, v in accuracy] + [(f"lens · {k}", v) for k, v in harmful + harmless]
               + [(f"MMD · {k}", v) for k, v in noise] + [(f"Δweights · {k}", v) for k, v in weights])
    numbers = ("<details><summary>Numbers per layer</summary><table><thead><tr><th>layer</th>"
               + "".join(f"<th>{escape(name)}</th>" for name, _ in columns) + "</tr></thead><tbody>"
               + "".join(f"<tr><td>{escape(layer)}</td>" + "".join(f"<td>{_fmt(values[i], 4)}</td>"
                                                                for _, values in columns) + "</tr>"
                         for i, layer in enumerate(layers)) + "</tbody></table></details>")
    data = report.get("data") if isinstance(report.get("data"), dict) else {}
    walls = [_number(_get(b, "wall_seconds")) for b in stages.values()]
    measured = sum(w for w in walls if w is not None) if any(w is not None for w in walls) else None
    sets = data.get("disjoint_from") if isinstance(data.get("disjoint_from"), list) else []
    parts = [
        '<p><a href="index.html">← leaderboard</a></p>',
        f"<h1>Depth analysis: {escape(title)}</h1>",
        f'<p class="note">Run {escape(str(report.get("run_name", source.parent.name)))} · seed '
        f"{escape(str(report.get('seed', '?')))} · {escape(str(data.get('harmful_prompts', '?')))} harmful and "
        f"{escape(str(data.get('harmless_prompts', '?')))} harmless prompts, "
        f"{escape(str(data.get('lens_pairs', '?')))} lens pairs, disjoint from "
        f"{escape(', '.join(map(str, sets)) or '–')} · {escape(str(report.get('layer_note', '')))} · "
        f"measured in {_fmt(measured, 1)} s of wall time (this probe.json written in "
        f"{_fmt(_number(report.get('wall_seconds')), 1)} s; cached stages are read, not measured again)</p>",
        "<h2>Does the defence remove what a linear probe can read?</h2>", table,
        '<div style="display:flex;flex-wrap:wrap;gap:1rem">',
        curve_chart("Linear-probe accuracy, harmful vs harmless prompts (chance 0.5)", layers, accuracy, "accuracy"),
        curve_chart("Logit lens: mean log-probability of harmful continuations", layers, harmful, "log p per token"),
        curve_chart("Logit lens: mean log-probability of harmless continuations", layers, harmless, "log p per token"),
        curve_chart("MMD of harmful MLP outputs to Gaussian noise", layers, noise, "MMD²"),
        curve_chart("Weight change per layer ||W_after - W_before||", layers, weights, "L2 norm") if weights else "",
        "</div>", numbers,
    ]
    return "\n".join(parts)


def probe_links(pages: dict[str, tuple[Path, dict[str, Any]]]) -> str:
    """The index's section listing the runs with a depth analysis (empty when there are none)."""
    if not pages:
        return ""
    items = "".join(f'<li><a href="{escape(name)}">{escape(str(report.get("run_name") or path.parent.name))}</a>'
                    f"</li>" for name, (path, report) in pages.items())
    return f"<h2>Depth analysis (<code>harness probe</code>)</h2><ul>{items}</ul>"
