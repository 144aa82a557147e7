"""One node: what its agent says about it, its history as plots, and its ranks (``enter`` on a node row)."""

from __future__ import annotations

from rich.table import Table
from textual.app import ComposeResult
from textual.containers import Grid, Horizontal
from textual.widgets import Footer, Static

from megascope.dashboard import formatting as fmt
from megascope.dashboard import levels
from megascope.dashboard.model.connections import ConnectionState
from megascope.dashboard.screens.base import BACK, ModelScreen, ViewState
from megascope.dashboard.screens.rank_log import LOG_BINDING, OpenRankLog, rank_under_cursor
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.palette import word
from megascope.dashboard.widgets.plot import Plot
from megascope.dashboard.widgets.tables import RanksTable, connection_text


class NodeScreen(ModelScreen):
    """One node: what its agent says about it, its history as plots, and its ranks."""

    BINDINGS = [BACK, LOG_BINDING]

    def __init__(self, agent: str) -> None:
        super().__init__()
        self.agent = agent

    def action_rank_log(self) -> None:
        """``l``: the output of the rank under the cursor of this node's rank table."""
        rank = rank_under_cursor(self.query_one("#node-ranks", RanksTable))
        if rank is None:
            self.notify("no rank under the cursor: this node lists none yet", severity="warning")
            return
        self.post_message(OpenRankLog(self.agent, rank))

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with Horizontal(id="node-top"):
            facts = Static(id="node-facts")
            facts.border_title = "Node"
            yield facts
            with Grid(id="node-plots"):
                percent = lambda v: f"{v:.0f}%"  # noqa: E731 - a one-line formatter
                rate = fmt.rate
                seconds_ago = lambda v: f"-{fmt.duration(-v)}" if v < 0 else "now"  # noqa: E731
                for plot_id, title, y_format, y_range in (
                    ("cpu", "CPU", percent, (0.0, 100.0)),
                    ("memory", "memory used", percent, (0.0, 100.0)),
                    ("disk", "disk read + write", rate, (0.0, None)),
                    ("net", "network rx + tx", rate, (0.0, None)),
                    ("gpu-util", "GPU utilisation (mean)", percent, (0.0, 100.0)),
                    ("gpu-memory", "GPU memory used", percent, (0.0, 100.0)),
                ):
                    plot = Plot(id=plot_id, y_format=y_format, x_format=seconds_ago, y_range=y_range)
                    plot.border_title = title
                    yield plot
        ranks = RanksTable(id="node-ranks")
        ranks.border_title = "Ranks on this node"
        yield ranks
        yield Footer()

    def show(self, state: ViewState) -> None:
        model, palette, now = state.model, state.palette, state.now
        self.show_header(state)
        row = next((r for r in model.node_rows() if r.agent == self.agent), None)
        history = model.node_history(self.agent)
        if row is None or history is None:
            self.query_one("#node-facts", Static).update(f"unknown agent {self.agent}")
            return
        self.query_one("#node-facts", Static).border_title = f"Node {row.node}"
        facts = Table.grid(padding=(0, 1))
        facts.add_column(style="dim", no_wrap=True)
        facts.add_column()
        facts.add_row("node", row.node)
        facts.add_row("host", row.hostname or "-")
        facts.add_row("agent", row.agent)
        connection_level = levels.CONNECTION_LEVELS[row.connection.value]
        facts.add_row("connection", word(connection_text(row, now), connection_level, palette))
        if row.connection is not ConnectionState.CONNECTED and row.connection_error:
            facts.add_row("reason", row.connection_error)
        facts.add_row("ranks", ", ".join(map(str, row.ranks)) or "-")
        facts.add_row("CPU", fmt.percent(row.cpu_percent))
        if row.memory_used_bytes is not None:
            facts.add_row("memory", f"{fmt.size(row.memory_used_bytes)} of {fmt.size(row.memory_total_bytes)}")
        disk = (row.disk_read_bytes_per_second, row.disk_write_bytes_per_second)
        net = (row.net_recv_bytes_per_second, row.net_sent_bytes_per_second)
        facts.add_row("disk r/w", f"{fmt.rate(disk[0])} / {fmt.rate(disk[1])}")
        facts.add_row("net rx/tx", f"{fmt.rate(net[0])} / {fmt.rate(net[1])}")
        if row.gpu_count:
            facts.add_row("GPUs", f"{row.gpu_count}, {fmt.percent(row.gpu_utilization_percent)} busy")
            gpu_memory = f"{fmt.size(row.gpu_memory_used_bytes)} of {fmt.size(row.gpu_memory_total_bytes)}"
            facts.add_row("GPU memory", gpu_memory)
            facts.add_row("GPU temp", f"{row.gpu_temperature_celsius:.0f} C (hottest)")
            facts.add_row("GPU power", f"{row.gpu_power_watts:.0f} W (total)")
        else:
            facts.add_row("GPU", row.gpu_status or "unknown")
        facts.add_row("history", fmt.duration(history.span_seconds))
        self.query_one("#node-facts", Static).update(facts)

        # x is "seconds before the newest sample", so the axis reads -10m00s ... now.
        def series(values: list[float]) -> list[tuple[float, float]]:
            return [(float(i - len(values) + 1), v) for i, v in enumerate(values)]

        for plot_id, values in (
            ("cpu", history.cpu_percent),
            ("memory", history.memory_percent),
            ("disk", history.disk_bytes_per_second),
            ("net", history.net_bytes_per_second),
            ("gpu-util", history.gpu_utilization_percent),
            ("gpu-memory", history.gpu_memory_percent),
        ):
            plot = self.query_one(f"#{plot_id}", Plot)
            plot.set_points(series(values))
            plot.display = bool(values) or not plot_id.startswith("gpu")
        ranks = [r for r in model.rank_rows() if r.agent == self.agent]
        self.query_one("#node-ranks", RanksTable).show(ranks, palette, now)
