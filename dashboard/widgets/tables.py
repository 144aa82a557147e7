"""Keyed tables: a DataTable updated cell by cell, and the dashboard's tables of ranks, nodes and events.

Widgets only draw views handed to them (``show(...)``); they never read the network or the model's insides.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable

from megascope.dashboard import formatting as fmt
from megascope.dashboard import levels
from megascope.dashboard.model.connections import ConnectionState
from megascope.dashboard.model.views import EventRow, NodeRow, RankRow, RankStatusName
from megascope.dashboard.widgets.palette import Palette, cell, word


class KeyedTable(DataTable[Text]):
    """A row-cursor DataTable whose rows and columns are keyed, updated cell by cell, with j/k moves.

    Not h/l: in a row-cursor table they would only scroll sideways, and ``h`` opens the heat map.
    """

    # j and k are ours; the other keys are DataTable's own, bound again here only to give help its words.
    BINDINGS = [
        Binding("down,j", "cursor_down", "Down", show=False, tooltip="move in a table"),
        Binding("up,k", "cursor_up", "Up", show=False, tooltip="move in a table"),
        Binding("left", "cursor_left", "Left", show=False, tooltip="scroll a table sideways"),
        Binding("right", "cursor_right", "Right", show=False, tooltip="scroll a table sideways"),
        Binding("pageup", "page_up", "Page up", show=False, tooltip="scroll a table"),
        Binding("pagedown", "page_down", "Page down", show=False, tooltip="scroll a table"),
        Binding("home", "scroll_home", "Home", show=False, tooltip="scroll a table"),
        Binding("end", "scroll_end", "End", show=False, tooltip="scroll a table"),
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
    # What DataTable binds enter to already; here for its line in help (the main screen opens the node).
    BINDINGS = [
        Binding(
            "enter",
            "select_cursor",
            "Open",
            show=False,
            tooltip="on a node row (or a rank row): open that node's screen",
        )
    ]
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
