"""The dashboard's charts, drawn on the server as SVG: no script runs and nothing is fetched.

Both charts span the campaign's local day (its time zone, DST included) on the x axis. Every
plotted point carries its time and value in ``data-`` attributes and a ``<title>``, so what a
chart shows can be read back exactly (the browser tests do).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from html import escape
from zoneinfo import ZoneInfo

from ..money import format_units

__all__ = ["Line", "SpendChart", "denials_chart", "spend_chart"]

WIDTH, HEIGHT = 760, 300
LEFT, RIGHT, TOP, BOTTOM = 78, 16, 16, 38
COLORS = ("#b3261e", "#1f6feb", "#8250df", "#bf8700", "#1a7f37", "#d1242f", "#57606a")


@dataclass(frozen=True, slots=True)
class SpendChart:
    """What the spend chart shows: the day ``[start_ms, end_ms)`` in ``tz``, the spend at each
    sample and now (``points``: (ms, units), oldest first, the last one now), the budget
    ``limit_units``, and under pacing the ideal curve and its burst allowance's upper edge
    (both as (ms, units) points)."""

    start_ms: int
    end_ms: int
    tz: str
    points: Sequence[tuple[int, int]]
    limit_units: int | None
    limit_label: str
    ideal: Sequence[tuple[int, int]] = ()
    upper: Sequence[tuple[int, int]] = ()


@dataclass(frozen=True, slots=True)
class Line:
    """One series of the denials chart: (ms, count) points."""

    label: str
    points: Sequence[tuple[int, int]] = field(default_factory=list)


class _Frame:
    """The plot area's scales: epoch ms to x, a value to y."""

    def __init__(self, start_ms: int, end_ms: int, top: int) -> None:
        self.start, self.span = start_ms, max(1, end_ms - start_ms)
        self.top = max(1, top)

    def x(self, ms: int) -> float:
        inner = WIDTH - LEFT - RIGHT
        return round(LEFT + inner * min(max(ms - self.start, 0), self.span) / self.span, 1)

    def y(self, value: int) -> float:
        inner = HEIGHT - TOP - BOTTOM
        return round(HEIGHT - BOTTOM - inner * min(max(value, 0), self.top) / self.top, 1)


def _nice_top(value: int) -> int:
    """A round number at or above ``value`` (1, 2 or 5 times a power of ten), for the y axis."""
    step = 1
    while True:
        for factor in (1, 2, 5):
            if step * factor >= value:
                return step * factor
        step *= 10


def _hours(start_ms: int, end_ms: int, tz: str) -> list[tuple[int, str]]:
    """Every third local hour of the day, as (epoch ms, ``HH:00``), DST included."""
    zone = ZoneInfo(tz)
    first = datetime.fromtimestamp(start_ms / 1000, zone)
    ticks = []
    for hour in range(0, 25, 3):
        moment = (first + timedelta(hours=hour)).astimezone(zone)
        ms = int(moment.timestamp() * 1000)
        if ms <= end_ms:
            ticks.append((ms, "24:00" if ms == end_ms else moment.strftime("%H:00")))
    return ticks


def _axes(frame: _Frame, chart_start: int, chart_end: int, tz: str, y_label: list[str]) -> str:
    parts = []
    for i, label in enumerate(y_label):
        value = frame.top * i // (len(y_label) - 1)
        y = frame.y(value)
        parts.append(
            f'<line class="grid" x1="{LEFT}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}"/>'
            f'<text class="tick" x="{LEFT - 6}" y="{y + 4}" text-anchor="end">{label}</text>'
        )
    for ms, label in _hours(chart_start, chart_end, tz):
        x = frame.x(ms)
        parts.append(
            f'<line class="grid" x1="{x}" y1="{TOP}" x2="{x}" y2="{HEIGHT - BOTTOM}"/>'
            f'<text class="tick" x="{x}" y="{HEIGHT - BOTTOM + 16}" text-anchor="middle">'
            f"{label}</text>"
        )
    parts.append(
        f'<line class="axis" x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" '
        f'y2="{HEIGHT - BOTTOM}"/><line class="axis" x1="{LEFT}" y1="{TOP}" x2="{LEFT}" '
        f'y2="{HEIGHT - BOTTOM}"/>'
    )
    return "".join(parts)


def _path(frame: _Frame, points: Sequence[tuple[int, int]]) -> str:
    return " ".join(f"{frame.x(ms)},{frame.y(v)}" for ms, v in points)


def _local(ms: int, tz: str) -> str:
    return datetime.fromtimestamp(ms / 1000, ZoneInfo(tz)).strftime("%H:%M:%S")


def spend_chart(chart: SpendChart, title: str) -> str:
    """The spend chart as an ``<svg>`` element."""
    values = [v for _, v in chart.points] + [v for _, v in chart.upper]
    values.append(chart.limit_units or 0)
    frame = _Frame(chart.start_ms, chart.end_ms, _nice_top(max([1, *values])))
    labels = [escape(format_units(frame.top * i // 4)) for i in range(5)]
    parts = [
        f'<svg class="chart spend-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>",
        _axes(frame, chart.start_ms, chart.end_ms, chart.tz, labels),
    ]
    if chart.ideal and chart.upper:
        band = [*chart.ideal, *reversed(chart.upper)]
        parts.append(f'<polygon class="band" points="{_path(frame, band)}"/>')
        parts.append(f'<polyline class="ideal" points="{_path(frame, chart.ideal)}"/>')
    if chart.limit_units is not None:
        y = frame.y(chart.limit_units)
        parts.append(
            f'<line class="limit" x1="{LEFT}" y1="{y}" x2="{WIDTH - RIGHT}" y2="{y}"/>'
            f'<text class="limit-label" x="{WIDTH - RIGHT - 4}" y="{y - 5}" text-anchor="end">'
            f"{escape(chart.limit_label)} {escape(format_units(chart.limit_units))}</text>"
        )
    if chart.points:
        parts.append(f'<polyline class="spend-line" points="{_path(frame, chart.points)}"/>')
        last = len(chart.points) - 1
        for i, (ms, units) in enumerate(chart.points):
            kind = "spend now" if i == last else "spend"
            shown = format_units(units)
            parts.append(
                f'<circle class="{kind}" cx="{frame.x(ms)}" cy="{frame.y(units)}" r="3" '
                f'data-at="{ms}" data-units="{units}" data-spend="{escape(shown)}">'
                f"<title>{_local(ms, chart.tz)}: {escape(shown)}</title></circle>"
            )
    parts.append("</svg>")
    return "".join(parts)


def denials_chart(lines: Sequence[Line], start_ms: int, end_ms: int, tz: str, title: str) -> str:
    """Denials by reason over the day, one line per reason, as an ``<svg>`` element."""
    top = _nice_top(max([4, *(v for line in lines for _, v in line.points)]))
    frame = _Frame(start_ms, end_ms, top)
    labels = [f"{top * i / 4:g}" for i in range(5)]
    parts = [
        f'<svg class="chart denials-chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(title)}" xmlns="http://www.w3.org/2000/svg">'
        f"<title>{escape(title)}</title>",
        _axes(frame, start_ms, end_ms, tz, labels),
    ]
    for i, line in enumerate(lines):
        color = COLORS[i % len(COLORS)]
        parts.append(
            f'<polyline class="denials" data-reason="{escape(line.label)}" stroke="{color}" '
            f'points="{_path(frame, line.points)}"><title>{escape(line.label)}</title>'
            "</polyline>"
        )
        for ms, count in line.points:
            parts.append(
                f'<circle class="denial" cx="{frame.x(ms)}" cy="{frame.y(count)}" r="2" '
                f'fill="{color}" data-reason="{escape(line.label)}" data-at="{ms}" '
                f'data-count="{count}"><title>{_local(ms, tz)}: {escape(line.label)} '
                f"{count}</title></circle>"
            )
        legend_y = TOP + 14 + 16 * i
        parts.append(
            f'<rect x="{LEFT + 10}" y="{legend_y - 9}" width="10" height="10" fill="{color}"/>'
            f'<text class="legend" x="{LEFT + 26}" y="{legend_y}">{escape(line.label)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)
