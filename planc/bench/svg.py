"""Small inline-SVG line charts for the HTML report (no plotting dependency).

>>> svg = line_chart([Series("a", [0, 1, 2], [0, 1, 4])], "title", "x", "y")
>>> svg.startswith("<svg") and "polyline" in svg
True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape
from typing import Optional, Sequence

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22")
MAX_POINTS = 1500  # more points than pixels only makes the file bigger
LEGEND_W = 170  # the legend sits right of the plot, where it hides no line


@dataclass
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    color: Optional[str] = None
    dashed: bool = False
    step: bool = False
    """Draw as a staircase (CDFs, binned rates)."""


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round tick values covering [low, high]."""
    if high <= low:
        high = low + 1.0
    raw = (high - low) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first, last = math.floor(low / step), math.ceil(high / step - 1e-9)
    return [round(i * step, 10) for i in range(first, last + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    out = []
    for e in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1):
        out += [m * 10 ** e for m in (1, 2, 5) if low <= m * 10 ** e <= high]
    return out or [low, high]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:.3g}"


def _thin(xs: Sequence[float], ys: Sequence[float]) -> tuple[list, list]:
    if len(xs) <= MAX_POINTS:
        return list(xs), list(ys)
    idx = sorted({round(i * (len(xs) - 1) / (MAX_POINTS - 1)) for i in range(MAX_POINTS)})
    return [xs[i] for i in idx], [ys[i] for i in idx]


class _Frame:
    """Maps data to pixels inside the plot area."""

    def __init__(self, x_range, y_range, width, height, log_x):
        self.left, self.right, self.top, self.bottom = 62, width - LEGEND_W, 28, height - 42
        self.x0, self.x1 = x_range
        self.y0, self.y1 = y_range
        self.log_x = log_x

    def x(self, v: float) -> float:
        if self.log_x:
            v, a, b = math.log10(max(v, self.x0)), math.log10(self.x0), math.log10(self.x1)
        else:
            a, b = self.x0, self.x1
        return self.left + (v - a) / ((b - a) or 1) * (self.right - self.left)

    def y(self, v: float) -> float:
        return self.bottom - (v - self.y0) / ((self.y1 - self.y0) or 1) * (self.bottom - self.top)


def _points(frame: _Frame, s: Series) -> str:
    xs, ys = _thin(s.xs, s.ys)
    pts = []
    for i, (x, y) in enumerate(zip(xs, ys)):
        if s.step and i:
            pts.append((frame.x(x), frame.y(ys[i - 1])))
        pts.append((frame.x(x), frame.y(y)))
    return " ".join(f"{px:.1f},{py:.1f}" for px, py in pts)


def _axes(frame: _Frame, xticks, yticks, xlabel: str, ylabel: str, width: int, height: int) -> list[str]:
    out = [f'<rect x="{frame.left}" y="{frame.top}" width="{frame.right - frame.left}" '
           f'height="{frame.bottom - frame.top}" fill="none" stroke="#999"/>']
    for t in xticks:
        px = frame.x(t)
        out.append(f'<line x1="{px:.1f}" y1="{frame.top}" x2="{px:.1f}" y2="{frame.bottom}" stroke="#eee"/>')
        out.append(f'<text x="{px:.1f}" y="{frame.bottom + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for t in yticks:
        py = frame.y(t)
        out.append(f'<line x1="{frame.left}" y1="{py:.1f}" x2="{frame.right}" y2="{py:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{frame.left - 5}" y="{py + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<text x="{(frame.left + frame.right) / 2}" y="{height - 8}" text-anchor="middle">{escape(xlabel)}</text>')
    out.append(f'<text transform="translate(14,{(frame.top + frame.bottom) / 2}) rotate(-90)" '
               f'text-anchor="middle">{escape(ylabel)}</text>')
    return out


def _legend(series: list[Series], frame: _Frame) -> list[str]:
    out = []
    for i, s in enumerate(series):
        y = frame.top + 8 + 14 * i
        dash = ' stroke-dasharray="5,3"' if s.dashed else ""
        out.append(f'<line x1="{frame.right + 10}" y1="{y}" x2="{frame.right + 30}" y2="{y}" '
                   f'stroke="{s.color}" stroke-width="2"{dash}/>')
        out.append(f'<text x="{frame.right + 35}" y="{y + 4}">{escape(s.label[:24])}</text>')
    return out


def line_chart(series: list[Series], title: str, xlabel: str, ylabel: str, width: int = 640, height: int = 300,
               log_x: bool = False, y_range: Optional[tuple[float, float]] = None) -> str:
    """An SVG line chart of `series` (empty series are skipped; no data gives a labelled empty frame)."""
    series = [s for s in series if len(s.xs)]
    for i, s in enumerate(series):
        s.color = s.color or PALETTE[i % len(PALETTE)]
    xs = [x for s in series for x in s.xs] or [0.0, 1.0]
    ys = [y for s in series for y in s.ys] or [0.0, 1.0]
    log_x = log_x and min(xs) > 0
    if log_x:
        xticks = log_ticks(min(xs), max(xs))
        x_range = (min(min(xs), xticks[0]), max(max(xs), xticks[-1]))
    else:
        xticks = nice_ticks(min(0.0, min(xs)), max(xs))
        x_range = (xticks[0], xticks[-1])
    yticks = nice_ticks(*(y_range or (min(0.0, min(ys)), max(ys) or 1.0)))
    frame = _Frame(x_range, (yticks[0], yticks[-1]), width, height, log_x)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(title)}</text>']
    parts += _axes(frame, xticks, yticks, xlabel, ylabel, width, height)
    for s in series:
        dash = ' stroke-dasharray="5,3"' if s.dashed else ""
        parts.append(f'<polyline fill="none" stroke="{s.color}" stroke-width="1.6"{dash} points="{_points(frame, s)}"/>')
    if not series:
        parts.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#999">no data</text>')
    parts += _legend(series, frame)
    parts.append("</svg>")
    return "\n".join(parts)
