"""The main screen: the cluster at a glance (job header, ranks, loss, nodes and the event log)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import DataTable, Footer

from megascope.dashboard.model.views import RankRow, RankStatusName
from megascope.dashboard.screens.base import ModelScreen, ViewState
from megascope.dashboard.screens.node import NodeScreen
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


class MainScreen(ModelScreen):
    """The cluster: job header, ranks, loss, nodes and the event log."""

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
            yield loss
        nodes = NodesTable(id="nodes")
        nodes.border_title = "Nodes (enter: details)"
        yield nodes
        events = EventsTable(id="events")
        events.border_title = "Events"
        yield events
        yield Footer()

    def __init__(self) -> None:
        super().__init__()
        self._rank_agents: dict[str, str] = {}
        """The agent of each rank row (by row key), as last drawn: ``enter`` on a rank opens its node."""

    def show(self, state: ViewState) -> None:
        model, palette = state.model, state.palette
        self.query_one(HeaderBar).show(model.header(), state.paused, palette, state.title)
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
        table.show(shown, palette)
        self.query_one("#loss", Plot).set_points([(float(s), v) for s, v in model.loss_history()])
        self.query_one(NodesTable).show(model.node_rows(), state.now, palette)
        self.query_one(EventsTable).show(model.events(limit=EVENTS_SHOWN), palette)

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """``enter`` on a node row, or on a rank row (its node), opens that node's screen."""
        key = event.row_key.value
        if key is None:
            return
        agent: str | None = None
        if event.data_table.id == "nodes":
            agent = key
        elif event.data_table.id == "ranks":
            agent = self._rank_agents.get(key)
        if agent is not None:
            self.app.push_screen(NodeScreen(agent))
