"""Small inline SVG charts: horizontal (stacked) bars, bars in panels of their own scale, and
grouped columns / histograms.

Plain SVG markup with no scripts, fonts or links, so the report renders offline anywhere; the
`xmlns` attribute is left out on purpose (inline SVG in HTML does not need it, and the report
carries no URL at all).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

WIDTH = 720
FONT = 'font-family="system-ui, sans-serif" font-size="12"'
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2")
KEPT = "#4c78a8"
REJECTED = "#e45756"


@dataclass(frozen=True)
class Segment:
    value: float
    color: str
    name: str


@dataclass(frozen=True)
class Bar:
    label: str
    segments: tuple[Segment, ...]


def fmt(value: float) -> str:
    if float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:,.3g}" if abs(value) < 100 else f"{value:,.0f}"


def nice_step(span: float, parts: int) -> float:
    """A 1/2/5 x 10^k step that cuts `span` into about `parts` pieces."""
    if span <= 0:
        return 1.0
    raw = span / parts
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def _text(x: float, y: float, text: str, anchor: str = "start", extra: str = "") -> str:
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>'
            f"{escape(text)}</text>")


def _legend(names: Sequence[tuple[str, str]], x: float, y: float) -> list[str]:
    parts = []
    for name, color in names:
        parts.append(f'<rect x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" fill="{color}"/>')
        parts.append(_text(x + 14, y, name))
        x += 24 + 7 * len(name)
    return parts


def _svg(height: float, title: str, body: list[str]) -> str:
    return (f'<svg class="chart" width="{WIDTH}" height="{height:.0f}" '
            f'viewBox="0 0 {WIDTH} {height:.0f}" role="img" {FONT}>'
            f"<title>{escape(title)}</title>{''.join(body)}</svg>")


def hbars(bars: Sequence[Bar], title: str) -> str:
    """One row per bar, segments stacked left to right, the total at the end."""
    label_width = min(280, 12 + 7 * max((len(b.label) for b in bars), default=0))
    value_width = 80
    row = 22
    scale_width = WIDTH - label_width - value_width
    largest = max((sum(s.value for s in b.segments) for b in bars), default=0) or 1
    names = list(dict.fromkeys((s.name, s.color) for b in bars for s in b.segments))
    body = _legend(names, label_width, 14) if len(names) > 1 else []
    top = 26 if body else 4
    for index, bar in enumerate(bars):
        y = top + index * row
        label = bar.label if len(bar.label) * 7 < label_width else bar.label[:36] + "…"
        body.append(_text(label_width - 6, y + 12, label, "end"))
        x = float(label_width)
        for segment in bar.segments:
            width = scale_width * segment.value / largest
            if width > 0:
                body.append(f'<rect x="{x:.1f}" y="{y + 2}" width="{width:.1f}" height="14" '
                            f'fill="{segment.color}"><title>{escape(segment.name)}: '
                            f"{fmt(segment.value)}</title></rect>")
            x += width
        total = sum(s.value for s in bar.segments)
        body.append(_text(x + 4, y + 13, fmt(total)))
    return _svg(top + row * len(bars) + 6, title, body)


@dataclass(frozen=True)
class Panel:
    """One group of bars on its own scale, under a heading (see `panels`)."""

    heading: str
    bars: tuple[tuple[str, float, str], ...]  # (label, value, color)
    top: float | None = None  # the scale's end; None: the largest value
    percent: bool = False  # shares in [0, 1], written as percentages


def panels(groups: Sequence[Panel], title: str) -> str:
    """Horizontal bars in groups, each group under its heading and on its own scale (a score
    next to a share, say), the value at the end of each bar."""
    labels = [label for group in groups for label, _, _ in group.bars]
    label_width = min(280, 12 + 7 * max((len(label) for label in labels), default=0))
    value_width = 80
    row = 22
    scale_width = WIDTH - label_width - value_width
    body: list[str] = []
    y = 0.0
    for group in groups:
        body.append(_text(4, y + 15, group.heading, extra=' font-weight="bold"'))
        y += 22
        top = group.top or max((v for _, v, _ in group.bars), default=0) or 1
        for label, value, color in group.bars:
            shown = label if len(label) * 7 < label_width else label[:36] + "…"
            text = f"{100 * value:.1f}%" if group.percent else fmt(value)
            body.append(_text(label_width - 6, y + 12, shown, "end"))
            width = scale_width * max(0.0, min(value / top, 1.0))
            if width > 0:
                body.append(f'<rect x="{label_width}" y="{y + 2:.1f}" width="{width:.1f}" '
                            f'height="14" fill="{color}"><title>{escape(label)}: '
                            f"{escape(text)}</title></rect>")
            body.append(_text(label_width + width + 4, y + 13, text))
            y += row
        y += 6
    return _svg(y + 4, title, body)


def columns(categories: Sequence[str], series: Sequence[tuple[str, Sequence[float]]],
            title: str, y_label: str = "") -> str:
    """Grouped vertical bars: one group per category, one bar per series."""
    left, right, top = 56, 12, 28
    rotate = len(categories) > 8 or max((len(c) for c in categories), default=0) > 10
    bottom = 16 + (min(90, 6 * max((len(c) for c in categories), default=0)) if rotate else 20)
    plot_height = 200
    height = top + plot_height + bottom
    largest = max((v for _, values in series for v in values), default=0)
    step = nice_step(largest, 4)
    if all(float(v).is_integer() for _, values in series for v in values):
        step = max(1.0, step)  # counts: no 0.5 ticks
    y_max = step * max(1, math.ceil(largest / step)) if largest > 0 else 1.0
    plot_width = WIDTH - left - right
    group = plot_width / max(1, len(categories))
    bar = min(48.0, max(1.0, (group * 0.8) / max(1, len(series))))
    body = _legend([(name, PALETTE[i % len(PALETTE)]) for i, (name, _) in enumerate(series)],
                   left, 14) if len(series) > 1 else []
    tick = 0.0
    while tick <= y_max + 1e-9:
        y = top + plot_height * (1 - tick / y_max)
        body.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{y:.1f}" y2="{y:.1f}" '
                    'stroke="#ddd"/>')
        body.append(_text(left - 4, y + 4, fmt(tick), "end"))
        tick += step
    if y_label:
        body.append(_text(12, top + plot_height / 2, y_label, "middle",
                          f' transform="rotate(-90 12 {top + plot_height / 2:.1f})"'))
    for c, category in enumerate(categories):
        x0 = left + c * group + (group - bar * len(series)) / 2
        for s, (name, values) in enumerate(series):
            value = values[c]
            h = plot_height * value / y_max
            body.append(f'<rect x="{x0 + s * bar:.1f}" y="{top + plot_height - h:.1f}" '
                        f'width="{max(bar - 1, 1):.1f}" height="{h:.1f}" '
                        f'fill="{PALETTE[s % len(PALETTE)]}"><title>{escape(name)} '
                        f"{escape(category)}: {fmt(value)}</title></rect>")
        x = left + c * group + group / 2
        y = top + plot_height + 14
        if rotate:
            body.append(_text(x, y, category, "end", f' transform="rotate(-40 {x:.1f} {y:.1f})"'))
        else:
            body.append(_text(x, y, category, "middle"))
    body.append(f'<line x1="{left}" x2="{WIDTH - right}" y1="{top + plot_height}" '
                f'y2="{top + plot_height}" stroke="#888"/>')
    return _svg(height, title, body)


def bin_edges(values: Sequence[float], bins: int = 20, integer: bool = False) -> list[float]:
    """Edges of up to `bins` equal bins of a 1/2/5 width from 0 (or the minimum, if negative)
    to the 99th percentile; larger values fall in the last bin. Values all within [0, 1] (shares,
    confidences) get twenty bins of 0.05."""
    if not values:
        return [0.0, 1.0]
    ordered = sorted(values)
    if not integer and ordered[0] >= 0 and ordered[-1] <= 1:
        return [round(i * 0.05, 2) for i in range(21)]
    low = min(ordered[0], 0.0)
    high = ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]
    width = nice_step(high - low, bins)
    if integer:
        width = max(1.0, width)
    start = math.floor(low / width) * width
    count = max(1, math.ceil((high - start) / width))
    if start + count * width <= high:
        count += 1
    return [start + i * width for i in range(count + 1)]


def histogram_counts(values: Sequence[float], edges: Sequence[float]) -> list[int]:
    """Counts per bin; the last bin also takes everything above the top edge."""
    counts = [0] * (len(edges) - 1)
    width = edges[1] - edges[0]
    for value in values:
        index = min(len(counts) - 1, max(0, int((value - edges[0]) // width)))
        counts[index] += 1
    return counts


def bin_labels(edges: Sequence[float], integer: bool, open_top: bool) -> list[str]:
    labels = []
    for i in range(len(edges) - 1):
        low, high = edges[i], edges[i + 1]
        if open_top and i == len(edges) - 2:
            labels.append(f"≥{fmt(low)}")
        elif integer and high - low <= 1:
            labels.append(fmt(low))
        elif integer:
            labels.append(f"{fmt(low)}-{fmt(high - 1)}")
        else:
            labels.append(f"{fmt(low)}-{fmt(high)}")
    return labels
