"""The main screen: the cluster at a glance (job header, ranks, loss, nodes and the event log).

It lays itself out for the terminal: below ``WIDE`` columns the loss plot gives its room to the rank table (``g``
opens the plots), and every table leaves out its least important columns first. ``/`` filters the ranks, nodes
and events at once; ``enter`` on an event opens it whole.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer, Input

from megascope.dashboard.model.views import EventRow, RankRow, RankStatusName, ema
from megascope.dashboard.screens.base import ModelScreen, ViewState
from megascope.dashboard.screens.event_detail import EventDetailScreen
from megascope.dashboard.screens.node import NodeScreen
from megascope.dashboard.screens.rank_log import LOG_BINDING, OpenRankLog, rank_under_cursor
from megascope.dashboard.widgets.bars import FaultBar, StragglerBar
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.plot import Plot
from megascope.dashboard.widgets.tables import EventsTable, NodesTable, RanksTable

EVENTS_SHOWN = 200
"""The event table holds the newest this many (the model keeps more, for `megascope status`)."""
RANK_ROWS_SHOWN = 256
"""The main screen's rank table holds at most this many ranks, those most worth a look first: a table of
thousands is unreadable and costs a redraw tick to draw; the heat map (``h``) shows every rank."""


def ranks_worth_a_look(rows: list[RankRow], limit: int) -> list[RankRow]:
    """All ``rows`` when they fit; else flagged and unhealthy ranks first, then the others, ``limit`` in all."""
    if len(rows) <= limit:
        return rows
    notable = [r for r in rows if r.straggler is not None or r.status not in (RankStatusName.RUNNING,
                                                                             RankStatusName.EXITED)]  # fmt: skip
    shown = {r.rank for r in notable[:limit]}
    return notable[:limit] + [r for r in rows if r.rank not in shown][: max(0, limit - len(notable))]


WIDE = 160
"""From this many columns the loss plot sits beside the rank table; below, the table gets every column there."""
TALL = 36
"""Below this many lines every part of the screen gives up height so that all of them still show (80x24)."""
FILTER_HINT = "filter: words all must match; status:failed sev:error node:node1 rank:3 -word (enter keeps, esc clears)"


class MainScreen(ModelScreen):
    """The cluster: job header, ranks, loss, nodes and the event log."""

    BINDINGS = [
        Binding(
            "slash", "filter", "Filter", key_display="/",
            tooltip="filter the ranks, nodes and events by text, status or severity (status:failed sev:error "
            "node:node1 rank:3, -word excludes); esc clears it",
        ),
        LOG_BINDING,
    ]  # fmt: skip

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield StragglerBar(id="stragglers")
        yield FaultBar(id="faults")
        with Horizontal(id="top"):
            ranks = RanksTable(id="ranks")
            ranks.border_title = "Ranks"
            yield ranks
            loss = Plot(id="loss", y_format=lambda v: f"{v:.3f}", x_format=lambda s: f"step {s:,.0f}")
            loss.border_title = "Loss (mean over ranks)"
            loss.border_subtitle = "g: plots"
            yield loss
        nodes = NodesTable(id="nodes")
        nodes.border_title = "Nodes (enter: details)"
        yield nodes
        events = EventsTable(id="events")
        events.border_title = "Events (enter: the whole event)"
        yield events
        yield Input(placeholder=FILTER_HINT, id="filter")
        yield Footer()

    def __init__(self) -> None:
        super().__init__()
        self._rank_agents: dict[str, str] = {}
        """The agent of each rank row (by row key), as last drawn: ``enter`` on a rank opens its node."""
        self._events: dict[str, EventRow] = {}
        """The events shown, by row key: ``enter`` on one opens it whole."""

    def on_mount(self) -> None:
        self.query_one("#filter", Input).display = False

    # -- the filter ----------------------------------------------------------------------------------------

    def action_filter(self) -> None:
        field = self.query_one("#filter", Input)
        field.display = True
        field.focus()

    def set_filter(self, query: str) -> None:
        for table in (self.query_one(RanksTable), self.query_one(NodesTable), self.query_one(EventsTable)):
            table.set_filter(query)

    def on_input_changed(self, event: Input.Changed) -> None:
        if event.input.id == "filter":
            self.set_filter(event.value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id == "filter":
            # The filter stays while the field goes away: the filtered tables get the room back.
            event.input.display = bool(event.value)
            self.query_one(RanksTable).focus()

    def key_escape(self) -> None:
        field = self.query_one("#filter", Input)
        if field.display or field.value:
            field.value = ""
            field.display = False
            self.set_filter("")
            self.query_one(RanksTable).focus()

    # -- drawing -------------------------------------------------------------------------------------------

    def show(self, state: ViewState) -> None:
        model, palette = state.model, state.palette
        self.show_header(state)
        self.query_one(StragglerBar).show(model.straggler_flags(active_only=True), palette)
        self.query_one(FaultBar).show(model.header(), palette)
        rows = model.rank_rows()
        self._rank_agents = {str(row.rank): row.agent for row in rows}
        shown = ranks_worth_a_look(rows, RANK_ROWS_SHOWN)
        table = self.query_one(RanksTable)
        table.border_title = (
            "Ranks"
            if len(shown) == len(rows)
            else f"Ranks: {len(shown)} of {len(rows):,}, flagged and unhealthy first (h: heat map of all)"
        )
        process_only = sum(1 for row in rows if row.process_only)
        if process_only:
            # An unmodified script: say plainly what it takes to see steps, loss and stragglers.
            table.border_title += f" | {process_only} process only: step telemetry: add megascope.api.step()"
        table.show(shown, palette, state.now)
        loss = self.query_one("#loss", Plot)
        loss.border_title = f"Loss (mean over ranks, EMA {state.smoothing:g})" if state.smoothing else "Loss (mean)"
        loss.set_points([(float(s), v) for s, v in ema(model.loss_history(), state.smoothing)])
        self.query_one(NodesTable).show(model.node_rows(), state.now, palette)
        events = model.events(limit=EVENTS_SHOWN)
        self._events = {str(e.id): e for e in events}
        self.query_one(EventsTable).show(events, palette)

    def action_rank_log(self) -> None:
        """``l``: the output of the rank under the rank table's cursor."""
        rank = rank_under_cursor(self.query_one(RanksTable))
        agent = self._rank_agents.get(str(rank)) if rank is not None else None
        if rank is None or agent is None:
            self.notify("no rank under the cursor: move to a rank in the rank table, then press l", severity="warning")
            return
        self.post_message(OpenRankLog(agent, rank))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """``enter`` on a node row, or on a rank row (its node), opens that node's screen; on an event, the event."""
        key = event.row_key.value
        if key is None:
            return
        agent: str | None = None
        if event.data_table.id == "events":
            row = self._events.get(key)
            if row is not None:
                self.app.push_screen(EventDetailScreen(row))
            return
        if event.data_table.id == "nodes":
            agent = key
        elif event.data_table.id == "ranks":
            agent = self._rank_agents.get(key)
        if agent is not None:
            self.app.push_screen(NodeScreen(agent))
