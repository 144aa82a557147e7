"""Widgets of the dashboard: the header bar, keyed tables, the event log and a small plot with axis labels.

Widgets only draw views handed to them (``show(...)``); they never read the network or the model's insides.
Colours come from the active theme's ``text-success`` / ``text-warning`` / ``text-error`` so light and
dark themes both read well, and every coloured value also carries a text marker or a word.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rich.segment import Segment
from rich.style import Style
from rich.text import Text
from textual import events
from textual.app import App
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip
from textual.widget import Widget
from textual.widgets import DataTable, Static

from megascope.dashboard import formatting as fmt
from megascope.dashboard import levels
from megascope.dashboard.levels import Level
from megascope.dashboard.model.cluster import (
    ConnectionState,
    EventRow,
    HeaderView,
    NodeRow,
    PhaseTimes,
    RankRow,
    RankStatusName,
    RankTimeline,
)
from megascope.dashboard.model.stragglers import HeatMap, StragglerFlag


@dataclass(frozen=True)
class Palette:
    """Theme colours for the three levels, read from the app's CSS variables."""

    ok: str
    warn: str
    bad: str

    @classmethod
    def from_app(cls, app: App[object]) -> Palette:
        variables = app.get_css_variables()
        return cls(ok=variables["text-success"], warn=variables["text-warning"], bad=variables["text-error"])

    def colour(self, level: Level | None) -> str:
        if level is None:
            return ""
        return {Level.OK: self.ok, Level.WARN: self.warn, Level.BAD: self.bad}[level]


def cell(text: str, level: Level | None = None, palette: Palette | None = None, *, right: bool = True) -> Text:
    """A table cell: ``text`` in the level's colour, followed by its marker padded to two columns.

    The padding keeps right-aligned numbers lined up whether or not they carry a marker.
    """
    marker = levels.MARKERS[level] if level is not None else ""
    style = palette.colour(level) if palette is not None else ""
    if right:
        return Text(f"{text}{marker:<2}", style=style, justify="right", no_wrap=True)
    return Text(text, style=style, no_wrap=True)


def word(text: str, level: Level | None, palette: Palette) -> Text:
    """A status word in its level's colour (the word itself says what the colour says)."""
    style = palette.colour(level)
    return Text(text, style=f"bold {style}" if level is Level.BAD else style, no_wrap=True)


# ----------------------------------------------------------------------------------------------------------


class HeaderBar(Static):
    """One line of job-level figures, with a PAUSED badge while the view is frozen."""

    _last: tuple[HeaderView, str] | None = None
    text: Text = Text()
    """What the bar shows now (tests read it)."""

    def set_paused(self, paused: bool, palette: Palette) -> None:
        """Redraw the last figures with or without the badge."""
        if self._last is not None:
            self.show(self._last[0], paused, palette, self._last[1])

    def show(self, header: HeaderView, paused: bool, palette: Palette, title: str = "megascope") -> None:
        self._last = (header, title)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {title} ", style="bold")
        if paused:
            text.append(" PAUSED ", style=f"bold reverse {palette.warn}")
            text.append(" ")
        step = fmt.number(header.step)
        if header.total_steps:
            step += f"/{header.total_steps:,}"
        connected_level = (
            Level.OK if header.connected_agents == header.total_agents and header.total_agents else Level.BAD
        )
        if header.connected_agents and header.connected_agents < header.total_agents:
            connected_level = Level.WARN
        fields: list[tuple[str, str, Level | None]] = [
            ("step", step, None),
            ("tok/s", fmt.number(header.tokens_per_second), None),
            ("MFU", fmt.percent(None if header.mfu is None else 100 * header.mfu, 1), None),
            ("loss", fmt.loss(header.loss), None),
            ("step time", "-" if header.step_seconds is None else f"{1000 * header.step_seconds:,.0f} ms", None),
            ("ETA", fmt.duration(header.eta_seconds), None),
            ("up", fmt.duration(header.uptime_seconds), None),
            ("agents", f"{header.connected_agents}/{header.total_agents}", connected_level),
        ]
        ranks = f"{header.known_ranks}"
        if header.world_size:
            ranks += f"/{header.world_size}"
        fields.append(("ranks", ranks, None))
        fields.append(("stragglers", str(header.stragglers), Level.WARN if header.stragglers else None))
        if header.checkpoint is not None:
            fields.append(("ckpt", header.checkpoint, None))
        if header.restarts:
            fields.append(("restarts", str(header.restarts), Level.WARN))
        for i, (label, value, level) in enumerate(fields):
            if i:
                text.append(" | ", style="dim")
            text.append(f"{label} ", style="dim")
            text.append(value + levels.MARKERS[level] if level is not None else value, style=palette.colour(level))
        self.text = text
        self.update(text)


class KeyedTable(DataTable[Text]):
    """A row-cursor DataTable whose rows and columns are keyed, updated cell by cell, with j/k moves.

    Not h/l: in a row-cursor table they would only scroll sideways, and ``h`` opens the heat map.
    """

    BINDINGS = [
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
    ]

    COLUMNS: Sequence[tuple[str, str, int]] = ()
    """(key, label, width) of each column."""
    FLEX_COLUMN: str | None = None
    """The column that takes whatever width the others leave (at least its own width)."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._order: list[str] = []
        self._cells: dict[tuple[str, str], Text] = {}
        self._rows: list[tuple[str, Sequence[Text]]] = []
        self._widths: dict[str, int] = {key: width for key, _, width in self.COLUMNS}

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        for key, label, _ in self.COLUMNS:
            self.add_column(label, width=self._widths[key], key=key)

    def on_resize(self) -> None:
        if self.FLEX_COLUMN is None:
            return
        # Each column also takes cell padding on both sides; keep room for a vertical scrollbar.
        others = sum(w + 2 * self.cell_padding for k, _, w in self.COLUMNS if k != self.FLEX_COLUMN)
        minimum = next(w for k, _, w in self.COLUMNS if k == self.FLEX_COLUMN)
        width = max(minimum, self.size.width - others - 2 * self.cell_padding - 2)
        if width != self._widths[self.FLEX_COLUMN]:
            self._widths[self.FLEX_COLUMN] = width
            self._rebuild(self._rows, relayout=True)

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Text]]]) -> None:
        """Make the table show exactly ``rows`` (key, cells) in that order, touching only changed cells."""
        self._rows = list(rows)
        keys = [key for key, _ in rows]
        column_keys = [key for key, _, _ in self.COLUMNS]
        if keys != self._order:
            dropped = _dropped_then_appended(self._order, keys)
            if dropped is None:
                self._rebuild(rows)
                return
            # The usual change in a bounded log: the oldest rows left, new ones came at the end.
            for key in self._order[:dropped]:
                self.remove_row(key)
                for column in column_keys:
                    self._cells.pop((key, column), None)
        for key, cells in rows:
            if key not in self.rows:
                self.add_row(*cells, key=key)
                self._cells.update({(key, c): v for c, v in zip(column_keys, cells, strict=True)})
                continue
            for column, value in zip(column_keys, cells, strict=True):
                current = self._cells.get((key, column))
                if current is not value and current != value:  # identity first: reused cells cost nothing
                    self.update_cell(key, column, value)
                    self._cells[(key, column)] = value
        self._order = keys

    def _rebuild(self, rows: Sequence[tuple[str, Sequence[Text]]], relayout: bool = False) -> None:
        """Redraw all rows (they came or went out of order), keeping the cursor on the same row.

        ``relayout`` also re-adds the columns: DataTable has no public way to resize one.
        """
        selected = self._order[self.cursor_row] if 0 <= self.cursor_row < len(self._order) else None
        self.clear(columns=relayout)
        if relayout:
            self._add_columns()
        self._cells.clear()
        column_keys = [key for key, _, _ in self.COLUMNS]
        for key, cells in rows:
            self.add_row(*cells, key=key)
            self._cells.update({(key, c): v for c, v in zip(column_keys, cells, strict=True)})
        self._order = [key for key, _ in rows]
        if selected in self._order:
            self.move_cursor(row=self._order.index(selected), animate=False)

    def selected_key(self) -> str | None:
        if 0 <= self.cursor_row < len(self._order):
            return self._order[self.cursor_row]
        return None


def _dropped_then_appended(old: list[str], new: list[str]) -> int | None:
    """How many leading ``old`` keys to drop so that ``new`` only appends; None if that is not the change."""
    if not new:
        return len(old)
    start = old.index(new[0]) if new[0] in old else len(old)
    kept = old[start:]
    return start if new[: len(kept)] == kept else None


class RanksTable(KeyedTable):
    COLUMNS = (
        ("rank", "rank", 5),
        ("node", "node", 9),
        ("status", "status", 15),
        ("step", "step", 7),
        ("step_ms", "step ms", 8),
        ("data", "data %", 7),
        ("comm", "comm %", 7),
        ("loss", "loss", 7),
        ("tps", "tok/s", 8),
        ("mfu", "MFU", 7),
        ("restarts", "restarts", 8),
    )

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._made: dict[str, tuple[RankRow, Palette, list[Text]]] = {}
        """Each shown row's cells and what they were made from: an unchanged row reuses its cells."""

    def show(self, rows: Sequence[RankRow], palette: Palette) -> None:
        made: dict[str, tuple[RankRow, Palette, list[Text]]] = {}
        for row in rows:
            key = str(row.rank)
            before = self._made.get(key)
            same = before is not None and before[0] == row and before[1] == palette
            made[key] = before if same and before is not None else (row, palette, rank_cells(row, palette))
        self._made = made
        self.set_rows([(key, cells) for key, (_, _, cells) in made.items()])


def rank_cells(row: RankRow, palette: Palette) -> list[Text]:
    return [
        cell(str(row.rank)),
        cell(row.node, right=False),
        rank_status_word(row, palette),
        cell(fmt.number(row.step)),
        cell(fmt.number(row.step_ms), levels.STEP_TIME_RATIO.level(row.step_time_ratio), palette),
        cell(fmt.percent(row.data_wait_percent, 1), levels.DATA_WAIT.level(row.data_wait_percent), palette),
        cell(fmt.percent(row.comm_wait_percent, 1), levels.COMM_WAIT.level(row.comm_wait_percent), palette),
        cell(fmt.loss(row.loss)),
        cell(fmt.number(row.tokens_per_second)),
        cell(fmt.percent(None if row.mfu is None else 100 * row.mfu, 1)),
        cell(str(row.restarts)),
    ]


def rank_status_word(row: RankRow, palette: Palette) -> Text:
    """The process state; ``SLOW <cause>`` for a running rank flagged as a straggler; ``FAILED <how>`` (``SIGKILL``,
    ``exit 1``) for a failed rank whose end its agent knows."""
    if row.straggler is not None and row.status is RankStatusName.RUNNING:
        return word(f"SLOW {row.straggler.cause.value}", levels.STATUS_LEVELS["SLOW"], palette)
    if row.status is RankStatusName.FAILED and row.exit_reason:
        how = row.exit_reason.replace("exit code ", "exit ")  # "FAILED exit 137" fits the column
        return word(f"FAILED {how}", levels.STATUS_LEVELS["FAILED"], palette)
    return word(row.status.value, levels.STATUS_LEVELS.get(row.status.value), palette)


class NodesTable(KeyedTable):
    COLUMNS = (
        ("node", "node", 10),
        ("agent", "agent", 21),
        ("connection", "connection", 19),
        ("cpu", "CPU", 6),
        ("memory", "memory", 13),
        ("disk", "disk r/w /s", 13),
        ("net", "net rx/tx /s", 13),
        ("gpu", "GPU", 7),
        ("gpu_memory", "GPU mem", 12),
        ("gpu_temp", "temp", 6),
        ("gpu_power", "power", 6),
    )

    def show(self, rows: Sequence[NodeRow], now: float, palette: Palette) -> None:
        self.set_rows([(r.agent, node_cells(r, now, palette)) for r in rows])


def connection_text(row: NodeRow, now: float) -> str:
    """``CONNECTED``, or ``DISCONNECTED 12s`` (how long it has been in that state)."""
    if row.connection is ConnectionState.CONNECTED:
        return row.connection.value
    return f"{row.connection.value} {fmt.duration(now - row.connection_since)}"


def node_cells(row: NodeRow, now: float, palette: Palette) -> list[Text]:
    memory = "-"
    if row.memory_used_bytes is not None and row.memory_total_bytes:
        memory = f"{fmt.compact(row.memory_used_bytes)}/{fmt.compact(row.memory_total_bytes)}"
    disk = f"{fmt.compact(row.disk_read_bytes_per_second)}/{fmt.compact(row.disk_write_bytes_per_second)}"
    net = f"{fmt.compact(row.net_recv_bytes_per_second)}/{fmt.compact(row.net_sent_bytes_per_second)}"
    if row.gpu_count:
        gpu_util = cell(
            fmt.percent(row.gpu_utilization_percent), levels.GPU_UTIL.level(row.gpu_utilization_percent), palette
        )
        gpu_memory = cell(
            f"{fmt.compact(row.gpu_memory_used_bytes)}/{fmt.compact(row.gpu_memory_total_bytes)}",
            levels.GPU_MEMORY.level(row.gpu_memory_percent),
            palette,
        )
        temp = cell(
            f"{row.gpu_temperature_celsius:.0f}C",
            levels.GPU_TEMPERATURE.level(row.gpu_temperature_celsius),
            palette,
        )
        power = cell(f"{row.gpu_power_watts:.0f}W")
    else:
        # Say why there are no GPU figures rather than leaving blanks.
        gpu_util = cell("no GPU" if row.gpu_available is False else "-")
        gpu_memory = temp = power = cell("-")
    return [
        cell(row.node if row.node != row.agent else "-", right=False),  # unnamed until its agent answers
        cell(row.agent, right=False),
        word(connection_text(row, now), levels.CONNECTION_LEVELS[row.connection.value], palette),
        cell(fmt.percent(row.cpu_percent), levels.CPU.level(row.cpu_percent), palette),
        cell(memory, levels.MEMORY.level(row.memory_percent), palette),
        cell(disk),
        cell(net),
        gpu_util,
        gpu_memory,
        temp,
        power,
    ]


class EventsTable(KeyedTable):
    """The merged event log, newest at the bottom; follows new events while the cursor is on the last row."""

    COLUMNS = (
        ("time", "time", 8),
        ("node", "node", 10),
        ("severity", "sev", 5),
        ("rank", "rank", 5),
        ("step", "step", 7),
        ("kind", "kind", 17),  # "restart_requested", "straggler_cleared"
        ("text", "text", 40),
    )
    FLEX_COLUMN = "text"

    def show(self, events: Sequence[EventRow], palette: Palette) -> None:
        following = self.row_count == 0 or self.cursor_row >= self.row_count - 1
        self.set_rows([(str(e.id), event_cells(e, palette)) for e in events])
        if following and self.row_count:
            self.move_cursor(row=self.row_count - 1, animate=False)


def event_cells(event: EventRow, palette: Palette) -> list[Text]:
    return [
        cell(fmt.clock(event.wall_time), right=False),
        cell(event.node, right=False),
        word(event.severity, levels.SEVERITY_LEVELS.get(event.severity), palette),
        cell("" if event.rank is None else str(event.rank)),
        cell("" if event.step is None else fmt.number(event.step)),
        cell(event.kind, right=False),
        cell(event.text, right=False),
    ]


# ----------------------------------------------------------------------------------------------------------


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

    def set_points(self, points: Sequence[tuple[float, float]]) -> None:
        points = list(points)
        if points != self._points:
            self._points = points
            self.refresh()

    def render(self) -> Text:
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


# ----------------------------------------------------------------------------------------------------------
# Stragglers: the bar on the main screen, the heat map, the timeline


class StragglerBar(Static):
    """The straggler flags standing now, costliest first, one line each; hidden while there are none."""

    MAX_LINES = 3
    text: Text = Text()
    """What the bar shows now (tests read it)."""

    def show(self, flags: Sequence[StragglerFlag], palette: Palette) -> None:
        self.display = bool(flags)
        text = Text(no_wrap=True, overflow="ellipsis")
        ordered = sorted(flags, key=lambda f: (-f.cost_seconds, f.rank))
        for i, flag in enumerate(ordered[: self.MAX_LINES]):
            if i:
                text.append("\n")
            text.append(f" STRAGGLER{levels.MARKERS[Level.WARN]} ", style=f"bold {palette.warn}")
            text.append(flag.describe())
        if len(ordered) > self.MAX_LINES:
            text.append(f"\n ... and {len(ordered) - self.MAX_LINES} more: h opens the heat map", style="dim")
        if text.plain != self.text.plain:
            self.text = text
            self.update(text)


class FaultBar(Static):
    """The job's faults: the newest crash or hang and what its restart cost, or that the job gave up; hidden
    while there has been none."""

    text: Text = Text()
    """What the bar shows now (tests read it)."""

    def show(self, header: HeaderView, palette: Palette) -> None:
        fault = header.last_fault
        self.display = fault is not None or header.job_failed is not None
        text = Text(no_wrap=True, overflow="ellipsis")
        if header.job_failed is not None:
            text.append(f" JOB FAILED{levels.MARKERS[Level.BAD]} ", style=f"bold {palette.bad}")
            text.append(header.job_failed)
        elif fault is not None:
            # Red while the job is down, yellow once a restart got it training again.
            level = Level.BAD if fault.restart is None else Level.WARN
            text.append(f" {fault.kind.upper()}{levels.MARKERS[level]} ", style=f"bold {palette.colour(level)}")
            text.append(fault.describe())
            text.append(f"  (job restarts: {header.restarts})", style="dim")
        if text.plain != self.text.plain:
            self.text = text
            self.update(text)


# Heat map cells: a glyph per level, so the map reads without colour too.
HEAT_MISSING = " "
HEAT_FASTER = "-"
"""Compute time below 1 / COMPUTE_RATIO.warn of the median rank's."""
HEAT_GLYPHS: dict[Level, str] = {Level.OK: "·", Level.WARN: "+", Level.BAD: "#"}


def heat_glyph(ratio: float) -> tuple[str, Level | None]:
    """The cell of one compute-time ratio: its glyph and its level (None: no colour)."""
    if math.isnan(ratio):
        return HEAT_MISSING, None
    if ratio * levels.COMPUTE_RATIO.warn < 1.0:
        return HEAT_FASTER, None
    level = levels.COMPUTE_RATIO.level(ratio)
    assert level is not None
    return HEAT_GLYPHS[level], level


class HeatMapView(ScrollView, can_focus=True):
    """Ranks (lines, grouped under a line per node) x recent steps (columns, newest at the right).

    Draws only the lines on screen (``render_line``), so thousands of ranks cost what a screenful does. The
    cursor is on a rank line; ``enter`` posts :class:`RankSelected`.
    """

    LABEL_WIDTH = 21
    """``  1234 SLOW compute! `` before the cells."""

    BINDINGS = [
        Binding("up,k", "move(-1)", "Up", show=False),
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("pageup", "move(-20)", "Page up", show=False),
        Binding("pagedown", "move(20)", "Page down", show=False),
        Binding("home", "move(-1000000)", "First", show=False),
        Binding("end", "move(1000000)", "Last", show=False),
        Binding("enter", "select", "Timeline"),
    ]

    class RankSelected(Message):
        def __init__(self, rank: int) -> None:
            super().__init__()
            self.rank = rank

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._heat: HeatMap | None = None
        self._flags: dict[int, StragglerFlag] = {}
        self._palette: Palette | None = None
        self._lines: list[tuple[str, int]] = []
        """("node", index of its first rank in the heat map) or ("rank", index of the rank in the heat map)."""
        self._rank_lines: list[int] = []
        """Line numbers of the rank lines, in order."""
        self._order_key: tuple[list[int], list[str]] | None = None
        self._node_sizes: dict[str, int] = {}
        self._node_flags: dict[str, int] = {}
        self.cursor = 0
        """Index into the rank lines."""

    def step_columns(self) -> int:
        """How many steps fit beside the labels."""
        return max(1, self.scrollable_content_region.width - self.LABEL_WIDTH)

    def set_data(self, heat: HeatMap, flags: dict[int, StragglerFlag], palette: Palette) -> None:
        if self._order_key != (heat.ranks, heat.nodes):
            selected = self.selected_rank()  # before the lines change under the cursor
            self._order_key = (list(heat.ranks), list(heat.nodes))
            self._layout(heat, selected)
        self._heat, self._flags, self._palette = heat, flags, palette
        self._node_flags = {}
        for flag in flags.values():
            self._node_flags[flag.node] = self._node_flags.get(flag.node, 0) + 1
        self.refresh()

    def _layout(self, heat: HeatMap, selected: int | None) -> None:
        first_rank: dict[str, int] = {}
        self._node_sizes = {}
        for rank, name in zip(heat.ranks, heat.nodes, strict=True):
            first_rank[name] = min(rank, first_rank.get(name, rank))
            self._node_sizes[name] = self._node_sizes.get(name, 0) + 1
        order = sorted(range(len(heat.ranks)), key=lambda i: (first_rank[heat.nodes[i]], heat.nodes[i], heat.ranks[i]))
        lines: list[tuple[str, int]] = []
        node: str | None = None
        for i in order:
            if heat.nodes[i] != node:
                node = heat.nodes[i]
                lines.append(("node", i))
            lines.append(("rank", i))
        self._lines = lines
        self._rank_lines = [n for n, (kind, _) in enumerate(lines) if kind == "rank"]
        self.virtual_size = Size(1, len(lines))  # lines never scroll sideways: the newest steps are kept
        if selected is not None and selected in heat.ranks:
            index = heat.ranks.index(selected)
            self.cursor = next(k for k, n in enumerate(self._rank_lines) if lines[n][1] == index)
        self.cursor = max(0, min(self.cursor, len(self._rank_lines) - 1))

    def selected_rank(self) -> int | None:
        if self._heat is None or not self._rank_lines or self._order_key is None:
            return None
        _, index = self._lines[self._rank_lines[self.cursor]]
        return self._order_key[0][index]

    def action_move(self, delta: int) -> None:
        if not self._rank_lines:
            return
        self.cursor = max(0, min(len(self._rank_lines) - 1, self.cursor + delta))
        line = self._rank_lines[self.cursor]
        # Keep the node line above the first rank in view too.
        self.scroll_to_region(Region(0, max(0, line - 1), 1, 2), animate=False, immediate=True)
        self.refresh()

    def action_select(self) -> None:
        rank = self.selected_rank()
        if rank is not None:
            self.post_message(self.RankSelected(rank))

    def on_click(self, event: events.Click) -> None:
        line = event.y + int(self.scroll_offset.y)
        if line in self._rank_lines:
            self.cursor = self._rank_lines.index(line)
            self.refresh()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        line = y + int(self.scroll_offset.y)
        heat, palette = self._heat, self._palette
        if heat is None or palette is None or line >= len(self._lines):
            return Strip.blank(width)
        kind, index = self._lines[line]
        if kind == "node":
            node = heat.nodes[index]
            count = self._node_sizes.get(node, 0)
            flagged = self._node_flags.get(node, 0)
            title = f"── {node}: {count} rank{'s' if count != 1 else ''}"
            if flagged:
                title += f", {flagged} flagged{levels.MARKERS[Level.WARN]}"
            title += " "
            return Strip([Segment(title.ljust(width, "─")[:width], Style(bold=True))])
        rank = heat.ranks[index]
        flag = self._flags.get(rank)
        selected = self._rank_lines[self.cursor] == line if self._rank_lines else False
        label_style = Style(reverse=True) if selected else Style()
        segments = [Segment(f"{rank:>6} ", label_style)]
        if flag is not None:
            tag = f"SLOW {flag.cause.value}{levels.MARKERS[Level.WARN]}"
            segments.append(Segment(f"{tag:<14}", label_style + Style.parse(f"bold {palette.warn}")))
        else:
            segments.append(Segment(" " * 14, label_style))
        columns = max(0, width - self.LABEL_WIDTH)
        ratios = heat.ratios[index][-columns:] if columns else heat.ratios[index][:0]
        # Right-align: the newest step is always in the last column.
        cells = [Segment(" " * (columns - len(ratios)))]
        run_glyph, run_level, run_length = "", None, 0
        for ratio in ratios.tolist():
            glyph, level = heat_glyph(ratio)
            if glyph == run_glyph and level == run_level:
                run_length += 1
                continue
            if run_length:
                cells.append(Segment(run_glyph * run_length, Style.parse(palette.colour(run_level) or "none")))
            run_glyph, run_level, run_length = glyph, level, 1
        if run_length:
            cells.append(Segment(run_glyph * run_length, Style.parse(palette.colour(run_level) or "none")))
        return Strip(segments + cells).crop(0, width)


# Phases of a step in the timeline: a letter each, so the bars read without colour.
TIMELINE_PHASES: tuple[tuple[str, str, Level | None, str], ...] = (
    ("data", "D", Level.WARN, "data wait"),
    ("forward", "F", Level.OK, "forward"),
    ("backward", "B", Level.OK, "backward compute"),
    ("comm", "W", Level.BAD, "waiting in collectives"),
    ("optimizer", "O", None, "optimizer"),
    ("other", ".", None, "other"),
)


def timeline_legend(palette: Palette) -> Text:
    text = Text(no_wrap=True)
    for i, (_, letter, level, what) in enumerate(TIMELINE_PHASES):
        if i:
            text.append("  ")
        text.append(letter, style=f"reverse {palette.colour(level)}" if level else "reverse")
        text.append(f" {what}")
    return text


def timeline_bars(
    steps: Sequence[int], phases: Sequence[PhaseTimes | None], scale: float, width: int, palette: Palette
) -> Text:
    """One line per step: the step number, a bar of its phases (``scale`` seconds fill ``width`` cells), the total."""
    text = Text(no_wrap=True)
    for i, (step, times) in enumerate(zip(steps, phases, strict=True)):
        if i:
            text.append("\n")
        text.append(f"{step:>7} ", style="dim")
        if times is None:
            text.append("(no report)", style="dim")
            continue
        # Cumulative rounding so the bar's length matches the total even when phases are short.
        drawn, elapsed = 0, 0.0
        for name, letter, level, _ in TIMELINE_PHASES:
            elapsed += getattr(times, name)
            end = round(elapsed / scale * width) if scale > 0 else 0
            if end > drawn:
                style = f"reverse {palette.colour(level)}" if level else "reverse"
                text.append(letter * (end - drawn), style=style)
                drawn = end
        text.append(" " * max(0, width - drawn))
        text.append(f" {times.total * 1000:>7,.0f} ms")
    return text


def timeline_scale(timeline: RankTimeline) -> float:
    """Seconds the full bar width stands for: the longest step on either side."""
    totals = [p.total for p in timeline.rank_phases if p is not None] + [p.total for p in timeline.median_phases]
    return max(totals, default=0.0)
