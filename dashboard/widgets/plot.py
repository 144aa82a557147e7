"""A small chart with axis labels: columns for one series (the loss plot, a node's history), or points of several
series, each with its own glyph as well as its colour (per-rank loss curves)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.text import Text
from textual.widget import Widget

_BLOCKS = " ▁▂▃▄▅▆▇█"


class Plot(Widget):
    """A column chart of (x, y) points with the y range on the left and the x range underneath.

    ``y_range`` fixes either end of the scale (0..100 for percentages, so a flat 40 % does not look like
    100 %; 0..auto for rates); an end left None follows the data. More points than columns are averaged
    into buckets; fewer are stretched.
    """

    DEFAULT_CSS = """
    Plot { height: 8; }
    """

    def __init__(
        self,
        *,
        y_format: Callable[[float], str] = lambda v: f"{v:.4g}",
        x_format: Callable[[float], str] = lambda v: f"{v:,.0f}",
        y_range: tuple[float | None, float | None] = (None, None),
        empty_text: str = "no data yet",
        id: str | None = None,
        classes: str | None = None,
    ) -> None:
        super().__init__(id=id, classes=classes)
        self.y_format = y_format
        self.x_format = x_format
        self.y_range = y_range
        self.empty_text = empty_text
        self._points: list[tuple[float, float]] = []
        self._lines: list[Series] = []

    def set_points(self, points: Sequence[tuple[float, float]]) -> None:
        points = list(points)
        if points != self._points or self._lines:
            self._points, self._lines = points, []
            self.refresh()

    def set_lines(self, series: Sequence[Series]) -> None:
        """Several series as points, on one scale; the first drawn first (a later one covers it where they meet)."""
        series = [s for s in series if s.points]
        if series != self._lines:
            self._lines = list(series)
            self._points = [p for s in series for p in s.points]
            self.refresh()

    def render(self) -> Text:
        if self._lines:
            return self._render_lines()
        width, height = self.content_size.width, self.content_size.height
        points = self._points
        if not points or width < 12 or height < 2:
            return Text(self.empty_text, style="dim", no_wrap=True)
        ys = [y for _, y in points]
        low = min(ys) if self.y_range[0] is None else self.y_range[0]
        high = max(ys) if self.y_range[1] is None else self.y_range[1]
        if high <= low:
            high = low + (abs(low) * 0.01 or 1.0)  # a flat line still gets a scale
        top_label, bottom_label = self.y_format(high), self.y_format(low)
        label_width = max(len(top_label), len(bottom_label))
        chart_width = width - label_width - 1
        rows = height - 1  # the last line holds the x range
        columns = _resample([y for _, y in points], chart_width)
        eighths = [round(max(0.0, min(1.0, (v - low) / (high - low))) * rows * 8) for v in columns]

        text = Text(no_wrap=True)
        for row in range(rows):
            if row == 0:
                label = top_label
            elif row == rows - 1:
                label = bottom_label
            else:
                label = ""
            text.append(f"{label:>{label_width}} ", style="dim")
            base = (rows - 1 - row) * 8
            text.append("".join(_BLOCKS[max(0, min(8, e - base))] for e in eighths))
            text.append("\n")
        first, last = self.x_format(points[0][0]), self.x_format(points[-1][0])
        gap = max(1, chart_width - len(first) - len(last))
        text.append(" " * (label_width + 1) + first + " " * gap + last, style="dim")
        return text

    def _render_lines(self) -> Text:
        width, height = self.content_size.width, self.content_size.height
        points = [p for s in self._lines for p in s.points]
        if not points or width < 12 or height < 2:
            return Text(self.empty_text, style="dim", no_wrap=True)
        ys = [y for _, y in points]
        xs = [x for x, _ in points]
        low = min(ys) if self.y_range[0] is None else self.y_range[0]
        high = max(ys) if self.y_range[1] is None else self.y_range[1]
        if high <= low:
            high = low + (abs(low) * 0.01 or 1.0)
        top_label, bottom_label = self.y_format(high), self.y_format(low)
        label_width = max(len(top_label), len(bottom_label))
        chart_width = width - label_width - 1
        rows = height - 1
        x_low, x_high = min(xs), max(xs)
        grid: list[list[tuple[str, str]]] = [[(" ", "")] * chart_width for _ in range(rows)]
        for series in self._lines:
            buckets: dict[int, list[float]] = {}
            for x, y in series.points:
                column = round((x - x_low) / (x_high - x_low) * (chart_width - 1)) if x_high > x_low else 0
                buckets.setdefault(column, []).append(y)
            for column, values in buckets.items():
                fraction = (sum(values) / len(values) - low) / (high - low)
                row = rows - 1 - round(max(0.0, min(1.0, fraction)) * (rows - 1))
                grid[row][column] = (series.glyph, series.style)
        text = Text(no_wrap=True)
        for row in range(rows):
            label = top_label if row == 0 else bottom_label if row == rows - 1 else ""
            text.append(f"{label:>{label_width}} ", style="dim")
            for glyph, style in grid[row]:
                text.append(glyph, style=style)
            text.append("\n")
        first, last = self.x_format(x_low), self.x_format(x_high)
        gap = max(1, chart_width - len(first) - len(last))
        text.append(" " * (label_width + 1) + first + " " * gap + last, style="dim")
        return text


@dataclass(frozen=True)
class Series:
    label: str
    points: list[tuple[float, float]]
    glyph: str = "•"
    """What marks its points, so series differ without colour."""
    style: str = ""


def _resample(values: list[float], width: int) -> list[float]:
    """``width`` values: bucket means when there are more values than columns, repeats when fewer."""
    if len(values) >= width:
        out = []
        for c in range(width):
            start, end = c * len(values) // width, (c + 1) * len(values) // width
            bucket = values[start : max(end, start + 1)]
            out.append(sum(bucket) / len(bucket))
        return out
    return [values[c * len(values) // width] for c in range(width)]
