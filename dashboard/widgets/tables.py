"""Keyed tables: a DataTable updated cell by cell, and the dashboard's tables of ranks, nodes and events.

Widgets only draw views handed to them (``show(...)``); they never read the network or the model's insides.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.binding import Binding
from textual.widgets import DataTable
from textual.widgets.data_table import ColumnKey

from megascope.dashboard import formatting as fmt
from megascope.dashboard import levels
from megascope.dashboard.model.connections import ConnectionState
from megascope.dashboard.model.views import EventRow, NodeRow, RankRow, RankStatusName
from megascope.dashboard.widgets.filtering import Term, parse_filter, row_matches, sort_rows
from megascope.dashboard.widgets.palette import Palette, cell, word


class KeyedTable(DataTable[Text]):
    """A row-cursor DataTable whose rows and columns are keyed, updated cell by cell, with j/k moves; columns that do
    not fit are left out by priority (``DROP_ORDER``), rows can be filtered (``set_filter``) and sorted by any column
    (``o`` / ``O``, or a click on its header).

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
        Binding(
            "o", "sort_next", "Sort", show=False,
            tooltip="sort the table under the cursor by its next column (o again: the one after; after the last, "
            "the table's own order); a click on a column's header sorts by it",
        ),
        Binding("O", "sort_reverse", "Reverse", show=False, tooltip="reverse the table's sort order"),
    ]  # fmt: skip

    COLUMNS: Sequence[tuple[str, str, int]] = ()
    """(key, label, width) of each column."""
    FLEX_COLUMN: str | None = None
    """The column that takes whatever width the others leave (at least its own width)."""
    DROP_ORDER: Sequence[str] = ()
    """The columns left out when the table is too narrow for all of them, the first left out first; the others
    always show. A row's cells still hold every column: the filter matches hidden ones too."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, cursor_type="row", zebra_stripes=True)
        self._order: list[str] = []
        self._cells: dict[tuple[str, str], Text] = {}
        self._all: list[tuple[str, Sequence[Text]]] = []
        """Every row handed to ``set_rows``, before the filter and the sort."""
        self._rows: list[tuple[str, Sequence[Text]]] = []
        """The rows shown, in the order shown."""
        self._widths: dict[str, int] = {key: width for key, _, width in self.COLUMNS}
        self._visible: list[str] = [key for key, _, _ in self.COLUMNS]
        self.filter_query = ""
        self._terms: list[Term] = []
        self.sort_column: str | None = None
        """The column rows are ordered by; None: the order they were handed in."""
        self.sort_descending = False
        self._aliases = {label.lower().replace(" ", ""): key for key, label, _ in self.COLUMNS}
        self._aliases.update({label.lower().split(" ")[0]: key for key, label, _ in self.COLUMNS})

    @property
    def visible_columns(self) -> list[str]:
        """The keys of the columns shown now, in order."""
        return list(self._visible)

    @property
    def shown_keys(self) -> list[str]:
        """The keys of the rows shown, top to bottom (after the filter and the sort)."""
        return list(self._order)

    def column_x(self, column: str) -> int | None:
        """The x offset of a shown column's first cell in the table's content (a test clicks its header)."""
        x = 0
        for key in self._visible:
            if key == column:
                return x
            x += self.columns[ColumnKey(key)].get_render_width(self)
        return None

    @property
    def total_rows(self) -> int:
        """Rows before the filter."""
        return len(self._all)

    def on_mount(self) -> None:
        self._add_columns()

    def _add_columns(self) -> None:
        for key, label, _ in self.COLUMNS:
            if key not in self._visible:
                continue
            width = self._widths[key]
            if key == self.sort_column:
                label = f"{label} {'▼' if self.sort_descending else '▲'}"
                width = max(width, len(label))
            self.add_column(label, width=width, key=key)

    def _layout(self) -> tuple[list[str], dict[str, int]]:
        """The columns that fit the table's width (dropping by ``DROP_ORDER``) and their widths."""
        available = self.size.width - 2  # room for a vertical scrollbar
        pad = 2 * self.cell_padding
        visible = [key for key, _, _ in self.COLUMNS]
        widths = {key: width for key, _, width in self.COLUMNS}

        def total() -> int:
            return sum(widths[k] + pad for k in visible)

        for key in self.DROP_ORDER:
            if available <= 0 or total() <= available:
                break
            visible.remove(key)
        if self.FLEX_COLUMN is not None and self.FLEX_COLUMN in visible and available > 0:
            widths[self.FLEX_COLUMN] += max(0, available - total())
        return visible, widths

    def on_resize(self) -> None:
        self._relayout_if_needed()

    def _relayout_if_needed(self, force: bool = False) -> None:
        visible, widths = self._layout()
        if force or visible != self._visible or any(widths[k] != self._widths[k] for k in visible):
            self._visible, self._widths = visible, widths
            self._rebuild(self._rows, relayout=True)

    # -- filter and sort -----------------------------------------------------------------------------------

    def set_filter(self, query: str) -> None:
        """Show only the rows that match ``query`` (see :mod:`megascope.dashboard.widgets.filtering`)."""
        if query == self.filter_query:
            return
        self.filter_query = query
        self._terms = parse_filter(query)
        self.set_rows(self._all)

    def sort_by(self, column: str | None, descending: bool = False) -> None:
        self.sort_column, self.sort_descending = column, descending
        self._relayout_if_needed(force=True)  # the header's arrow
        self.set_rows(self._all)

    def action_sort_next(self) -> None:
        columns = self._visible
        if self.sort_column not in columns:
            self.sort_by(columns[0] if columns else None)
        else:
            index = columns.index(self.sort_column) + 1  # type: ignore[arg-type]
            self.sort_by(columns[index] if index < len(columns) else None)

    def action_sort_reverse(self) -> None:
        if self.sort_column is not None:
            self.sort_by(self.sort_column, not self.sort_descending)

    def on_data_table_header_selected(self, event: DataTable.HeaderSelected) -> None:
        event.stop()
        column = event.column_key.value
        descending = column == self.sort_column and not self.sort_descending
        self.sort_by(column, descending)

    def _arranged(self, rows: Sequence[tuple[str, Sequence[Text]]]) -> list[tuple[str, Sequence[Text]]]:
        if not self._terms and self.sort_column is None:
            return list(rows)
        column_keys = [key for key, _, _ in self.COLUMNS]
        plain = [(key, {c: v.plain for c, v in zip(column_keys, cells, strict=True)}) for key, cells in rows]
        if self._terms:
            plain = [(key, cells) for key, cells in plain if row_matches(cells, self._terms, self._aliases)]
        by_key = dict(rows)
        if self.sort_column is None:
            return [(key, by_key[key]) for key, _ in plain]
        return [(key, by_key[key]) for key in sort_rows(plain, self.sort_column, self.sort_descending)]

    def _describe(self) -> str:
        parts = []
        if self.sort_column is not None:
            label = next(label for key, label, _ in self.COLUMNS if key == self.sort_column)
            parts.append(f"sorted by {label} {'▼' if self.sort_descending else '▲'}")
        if self._terms:
            parts.append(f"filter '{self.filter_query}': {len(self._rows)} of {len(self._all)}")
        return " · ".join(parts)

    # -- rows ----------------------------------------------------------------------------------------------

    def _shown_cells(self, cells: Sequence[Text]) -> list[Text]:
        return [value for (key, _, _), value in zip(self.COLUMNS, cells, strict=True) if key in self._visible]

    def set_rows(self, rows: Sequence[tuple[str, Sequence[Text]]]) -> None:
        """Make the table show ``rows`` (key, cells of every column) in that order, filtered and sorted as asked,
        touching only changed cells."""
        self._all = list(rows)
        rows = self._arranged(rows)
        self._rows = list(rows)
        self.border_subtitle = self._describe()
        keys = [key for key, _ in rows]
        if keys != self._order:
            dropped = _dropped_then_appended(self._order, keys)
            if dropped is None:
                self._rebuild(rows)
                return
            # The usual change in a bounded log: the oldest rows left, new ones came at the end.
            for key in self._order[:dropped]:
                self.remove_row(key)
                for column in self._visible:
                    self._cells.pop((key, column), None)
        for key, cells in rows:
            shown = self._shown_cells(cells)
            if key not in self.rows:
                self.add_row(*shown, key=key)
                self._cells.update({(key, c): v for c, v in zip(self._visible, shown, strict=True)})
                continue
            for column, value in zip(self._visible, shown, strict=True):
                current = self._cells.get((key, column))
                if current is not value and current != value:  # identity first: reused cells cost nothing
                    self.update_cell(key, column, value)
                    self._cells[(key, column)] = value
        self._order = keys

    def _rebuild(self, rows: Sequence[tuple[str, Sequence[Text]]], relayout: bool = False) -> None:
        """Redraw all rows (they came or went out of order), keeping the cursor on the same row.

        ``relayout`` also re-adds the columns: DataTable has no public way to resize or hide one.
        """
        selected = self._order[self.cursor_row] if 0 <= self.cursor_row < len(self._order) else None
        self.clear(columns=relayout)
        if relayout:
            self._add_columns()
        self._cells.clear()
        for key, cells in rows:
            shown = self._shown_cells(cells)
            self.add_row(*shown, key=key)
            self._cells.update({(key, c): v for c, v in zip(self._visible, shown, strict=True)})
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
        ("age", "last step", 9),
        ("step_ms", "step ms", 8),
        ("data", "data %", 7),
        ("comm", "comm %", 7),
        ("loss", "loss", 7),
        ("tps", "tok/s", 8),
        ("mfu", "MFU", 7),
        ("restarts", "restarts", 8),
    )
    # What an on-call engineer reads first stays longest: which rank, is it alive, where is it, how fast.
    DROP_ORDER = ("restarts", "node", "comm", "data", "mfu", "tps", "loss")

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._made: dict[str, tuple[tuple[RankRow, int | None], Palette, list[Text]]] = {}
        """Each shown row's cells and what they were made from: an unchanged row reuses its cells."""

    def show(self, rows: Sequence[RankRow], palette: Palette, now: float | None = None) -> None:
        made: dict[str, tuple[tuple[RankRow, int | None], Palette, list[Text]]] = {}
        for row in rows:
            key = str(row.rank)
            age = _age_seconds(row, now)
            source = (row, None if age is None else int(age))
            before = self._made.get(key)
            same = before is not None and before[0] == source and before[1] == palette
            made[key] = before if same and before is not None else (source, palette, rank_cells(row, palette, age))
        self._made = made
        self.set_rows([(key, cells) for key, (_, _, cells) in made.items()])


def _age_seconds(row: RankRow, now: float | None) -> float | None:
    if now is None or row.last_step_at is None:
        return None
    return max(0.0, now - row.last_step_at)


def rank_cells(row: RankRow, palette: Palette, age: float | None = None) -> list[Text]:
    return [
        cell(str(row.rank)),
        cell(row.node, right=False),
        rank_status_word(row, palette),
        cell(fmt.number(row.step)),
        cell(fmt.duration(age)),
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
            tooltip="on a node row (or a rank row): open that node's screen; on an event: the whole event",
        )
    ]
    COLUMNS = (
        ("node", "node", 10),
        ("agent", "agent", 21),
        ("connection", "connection", 19),
        ("cpu", "CPU", 6),
        ("memory", "memory", 15),
        ("disk_read", "disk r/s", 11),
        ("disk_write", "disk w/s", 11),
        ("net_recv", "net rx/s", 11),
        ("net_sent", "net tx/s", 11),
        ("gpu", "GPU", 7),
        ("gpu_memory", "GPU mem", 15),
        ("gpu_temp", "temp", 6),
        ("gpu_power", "power", 6),
    )
    DROP_ORDER = (
        "gpu_power", "gpu_temp", "disk_read", "disk_write", "net_sent", "net_recv", "agent", "gpu_memory", "gpu",
    )  # fmt: skip

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
        memory = fmt.size_pair(row.memory_used_bytes, row.memory_total_bytes)
    if row.gpu_count:
        gpu_util = cell(
            fmt.percent(row.gpu_utilization_percent), levels.GPU_UTIL.level(row.gpu_utilization_percent), palette
        )
        gpu_memory = cell(
            fmt.size_pair(row.gpu_memory_used_bytes, row.gpu_memory_total_bytes),
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
        cell(fmt.size(row.disk_read_bytes_per_second)),
        cell(fmt.size(row.disk_write_bytes_per_second)),
        cell(fmt.size(row.net_recv_bytes_per_second)),
        cell(fmt.size(row.net_sent_bytes_per_second)),
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
        ("text", "text", 24),
    )
    FLEX_COLUMN = "text"
    DROP_ORDER = ("step", "rank", "node")

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
