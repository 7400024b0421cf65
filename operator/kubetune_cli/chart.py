"""A line chart drawn with characters, for `kubectl finetune describe`. Pure: series in, lines of text out.

Each series is drawn as a line through its points (linear between them), one glyph per column with the gaps
between neighbouring columns filled, so a steep drop reads as a line and not as scattered dots. A series can
draw its line with a lighter glyph (``line_glyph``) and mark only its own points with ``glyph``: such lines
go below the solid ones, and every series' point marks go on top, so two close curves both stay visible.
Colours are ANSI escapes, only when asked for (a terminal).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

BLUE = "34"
RED = "31"
AXIS_LABEL_WIDTH = 9


@dataclass(frozen=True)
class Series:
    label: str
    xs: Sequence[float]
    ys: Sequence[float]
    glyph: str
    color: str
    line_glyph: str = ""
    """The glyph of the line between points; empty: ``glyph`` (a solid line)."""


def render(series: Sequence[Series], width: int = 80, height: int = 12, color: bool = False) -> list[str]:
    """The chart as lines of at most ``width`` characters (escapes not counted): y labels on the left, a
    step axis below and a legend naming each series with its glyph."""
    drawn = [s for s in series if len(s.xs) and len(s.ys)]
    if not drawn:
        return ["(no points)"]
    columns = max(10, width - AXIS_LABEL_WIDTH - 1)
    rows = max(3, height)
    xs = [x for s in drawn for x in s.xs[: len(s.ys)]]
    ys = [y for s in drawn for y in s.ys[: len(s.xs)]]
    x_lo, x_hi = min(xs), max(xs)
    y_lo, y_hi = _padded(min(ys), max(ys))
    grid: list[list[str]] = [[" "] * columns for _ in range(rows)]

    def row_of(y: float) -> int:
        return round((y_hi - y) / (y_hi - y_lo) * (rows - 1))

    def column_of(x: float) -> int:
        return 0 if x_hi == x_lo else round((x - x_lo) / (x_hi - x_lo) * (columns - 1))

    def paint(col: int, rows_: range, char: str, colour: str) -> None:
        for r in rows_:
            grid[r][col] = f"\x1b[{colour}m{char}\x1b[0m" if color else char

    dotted = [s for s in drawn if s.line_glyph and s.line_glyph != s.glyph]
    solid = [s for s in drawn if s not in dotted]
    for s in [*dotted, *solid]:
        points = list(zip(s.xs, s.ys, strict=False))
        previous_row: int | None = None
        for col in range(column_of(points[0][0]), column_of(points[-1][0]) + 1):
            row = row_of(_interpolate(points, x_lo + (x_hi - x_lo) * col / max(1, columns - 1)))
            # A steep change fills the column up to the previous column's row, so the line stays connected.
            low, high = (row, row) if previous_row is None else sorted((row, previous_row))
            paint(
                col,
                range(low, high + 1) if high - low > 1 else range(row, row + 1),
                s.line_glyph or s.glyph,
                s.color,
            )
            previous_row = row
    for s in dotted:
        for x, y in zip(s.xs, s.ys, strict=False):
            paint(column_of(x), range(row_of(y), row_of(y) + 1), s.glyph, s.color)
    lines = []
    for r in range(rows):
        value = y_hi - (y_hi - y_lo) * r / (rows - 1)
        label = f"{_number(value):>{AXIS_LABEL_WIDTH - 2}} +" if r in (0, rows // 2, rows - 1) else ""
        lines.append(f"{label:>{AXIS_LABEL_WIDTH}}" + "".join(grid[r]).rstrip())
    lines.append(" " * (AXIS_LABEL_WIDTH - 1) + "+" + "-" * columns)
    left, right = f"step {_number(x_lo)}", _number(x_hi)
    lines.append(" " * AXIS_LABEL_WIDTH + left + right.rjust(max(1, columns - len(left))))
    legend = "   ".join(
        (f"\x1b[{s.color}m{s.glyph}\x1b[0m" if color else s.glyph) + f" {s.label}" for s in drawn
    )
    lines.append(" " * AXIS_LABEL_WIDTH + legend)
    return lines


def _interpolate(points: list[tuple[float, float]], x: float) -> float:
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def _padded(lo: float, hi: float) -> tuple[float, float]:
    if math.isclose(lo, hi):
        pad = abs(lo) * 0.1 or 0.5
        return lo - pad, hi + pad
    return lo, hi


def _number(value: float) -> str:
    return f"{int(value)}" if float(value).is_integer() and abs(value) < 1e9 else f"{value:.4g}"
