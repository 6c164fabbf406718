"""Small inline-SVG charts for the static site: no JavaScript, no external files, every label escaped."""

from __future__ import annotations

import math
from html import escape
from typing import Callable, Sequence

WIDTH, HEIGHT = 640, 360
LEFT, RIGHT, TOP, BOTTOM = 64, 170, 36, 72  # margins; the legend sits in the right one
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f")

Point = tuple[float, float | None, float | None]  # value, interval low, interval high


def _text(x: float, y: float, content: str, **attrs: str) -> str:
    extra = "".join(f' {k.replace("_", "-")}="{escape(v)}"' for k, v in attrs.items())
    return f'<text x="{x:.1f}" y="{y:.1f}"{extra}>{escape(content)}</text>'


def _frame(title: str, x_label: str, y_label: str, body: list[str], legend: list[tuple[str, str]]) -> str:
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" role="img" viewBox="0 0 {WIDTH} {HEIGHT}" '
             f'width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="11">',
             f"<title>{escape(title)}</title>",
             f'<rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>',
             _text(WIDTH / 2, 18, title, text_anchor="middle", font_size="13"),
             _text(LEFT + plot_w / 2, HEIGHT - 8, x_label, text_anchor="middle"),
             f'<g transform="translate(14 {TOP + plot_h / 2:.1f}) rotate(-90)">'
             + _text(0, 0, y_label, text_anchor="middle") + "</g>"]
    parts += body
    for i, (name, colour) in enumerate(legend):
        y = TOP + 8 + 16 * i
        parts.append(f'<rect x="{WIDTH - RIGHT + 12}" y="{y - 8}" width="10" height="10" fill="{colour}"/>')
        parts.append(_text(WIDTH - RIGHT + 28, y + 1, name[:24]))
    parts.append("</svg>")
    return "\n".join(parts)


def _y_axis(low: float, high: float, ticks: int = 5) -> tuple[list[str], Callable[[float], float]]:
    plot_h = HEIGHT - TOP - BOTTOM

    def to_y(v: float) -> float:
        return TOP + plot_h * (1 - (v - low) / ((high - low) or 1))

    body = []
    for i in range(ticks + 1):
        v = low + (high - low) * i / ticks
        body.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{to_y(v):.1f}" y2="{to_y(v):.1f}" stroke="#eee"/>')
        body.append(_text(LEFT - 6, to_y(v) + 4, f"{v:.2f}", text_anchor="end"))
    return body, to_y


def line_chart(title: str, x_labels: Sequence[str], series: Sequence[tuple[str, Sequence[Point | None]]],
               x_label: str, y_label: str) -> str:
    """One line per series over categorical x positions, with interval whiskers; y in [0, 1]."""
    body, to_y = _y_axis(0.0, 1.0)
    plot_w = WIDTH - LEFT - RIGHT
    step = plot_w / max(len(x_labels), 1)

    def to_x(i: int) -> float:
        return LEFT + step * (i + 0.5)

    for i, name in enumerate(x_labels):
        x = to_x(i)
        body.append(f'<g transform="translate({x:.1f} {HEIGHT - BOTTOM + 12}) rotate(20)">'
                    + _text(0, 0, name[:28]) + "</g>")
    legend = []
    for s, (name, points) in enumerate(series):
        colour = PALETTE[s % len(PALETTE)]
        legend.append((name, colour))
        coords = [(to_x(i), p) for i, p in enumerate(points) if p is not None]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{to_y(p[0]):.1f}" for x, p in coords)
            body.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for x, (value, low, high) in coords:
            if low is not None and high is not None:
                lo, hi = to_y(max(0.0, low)), to_y(min(1.0, high))
                body.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{lo:.1f}" y2="{hi:.1f}" stroke="{colour}"/>')
            body.append(f'<circle cx="{x:.1f}" cy="{to_y(value):.1f}" r="4" fill="{colour}">'
                        f"<title>{escape(name)}: {value:.3f}</title></circle>")
    return _frame(title, x_label, y_label, body, legend)


def scatter_chart(title: str, points: Sequence[tuple[str, float, float, bool]], x_label: str, y_label: str) -> str:
    """Labelled points (name, x, y, flagged); flagged points are hollow. y in [0, 1]."""
    body, to_y = _y_axis(0.0, 1.0)
    xs = [p[1] for p in points] or [0.0]
    low, high = min(xs + [0.0]), max(xs + [0.0])
    pad = (high - low) * 0.1 or 0.05
    low, high = low - pad, high + pad
    plot_w = WIDTH - LEFT - RIGHT

    def to_x(v: float) -> float:
        return LEFT + plot_w * (v - low) / (high - low)

    digits = max(2, 1 - math.floor(math.log10((high - low) / 4)))  # enough to tell the ticks apart
    for i in range(5):
        v = low + (high - low) * i / 4
        body.append(_text(to_x(v), HEIGHT - BOTTOM + 16, f"{v:+.{digits}f}", text_anchor="middle"))
    body.append(f'<line x1="{to_x(0):.1f}" x2="{to_x(0):.1f}" y1="{TOP}" y2="{HEIGHT - BOTTOM}" '
                f'stroke="#bbb" stroke-dasharray="4 3"/>')
    legend = []
    for i, (name, x, y, flagged) in enumerate(points):
        colour = PALETTE[i % len(PALETTE)]
        legend.append((name + (" ⚑" if flagged else ""), colour))
        fill = "white" if flagged else colour
        body.append(f'<circle cx="{to_x(x):.1f}" cy="{to_y(y):.1f}" r="6" fill="{fill}" stroke="{colour}" '
                    f'stroke-width="2"><title>{escape(name)}: Δ {x:+.3f}, harm {y:.3f}</title></circle>')
    return _frame(title, x_label, y_label, body, legend)
