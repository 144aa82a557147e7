"""The dashboard's screens: the cluster overview, one node in detail, the straggler heat map, one rank's
timeline beside the median rank's, and help.

Screens draw a ``ViewState`` the app hands them on its redraw tick (``show``); they never read the network.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid, Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Static

from megascope.dashboard import formatting as fmt
from megascope.dashboard import levels
from megascope.dashboard.connection import STALE_AFTER
from megascope.dashboard.levels import Level
from megascope.dashboard.model.cluster import ClusterModel, ConnectionState, RankRow, RankStatusName
from megascope.dashboard.model.stragglers import DEFAULT_CONFIG, StragglerConfig
from megascope.dashboard.widgets.tables import (
    HEAT_FASTER,
    HEAT_GLYPHS,
    HEAT_MISSING,
    EventsTable,
    FaultBar,
    HeaderBar,
    HeatMapView,
    NodesTable,
    Palette,
    Plot,
    RanksTable,
    StragglerBar,
    connection_text,
    timeline_bars,
    timeline_legend,
    timeline_scale,
    word,
)

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


@dataclass(frozen=True)
class ViewState:
    """Everything a screen needs to draw one frame."""

    model: ClusterModel
    palette: Palette
    paused: bool
    now: float
    title: str


class ModelScreen(Screen[None]):
    """A screen the redraw tick updates."""

    frames_drawn = 0

    def show(self, state: ViewState) -> None:
        raise NotImplementedError

    def show_paused(self, state: ViewState) -> None:
        """Paused: only the badge changes, the figures stay as they were."""
        self.query_one(HeaderBar).set_paused(state.paused, state.palette)

    def on_screen_resume(self) -> None:
        # On top again (just opened, or a screen above it closed): draw now rather than at the next tick.
        self.app.call_later(self.app.refresh_view)  # type: ignore[attr-defined]


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

    def show(self, state: ViewState) -> None:
        model, palette = state.model, state.palette
        self.query_one(HeaderBar).show(model.header(), state.paused, palette, state.title)
        self.query_one(StragglerBar).show(model.straggler_flags(active_only=True), palette)
        self.query_one(FaultBar).show(model.header(), palette)
        rows = model.rank_rows()
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
        model: ClusterModel = self.app.model  # type: ignore[attr-defined]
        agent: str | None = None
        if event.data_table.id == "nodes":
            agent = key
        elif event.data_table.id == "ranks":
            agent = next((r.agent for r in model.rank_rows() if str(r.rank) == key), None)
        if agent is not None:
            self.app.push_screen(NodeScreen(agent))


class NodeScreen(ModelScreen):
    """One node: what its agent says about it, its history as plots, and its ranks."""

    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, agent: str) -> None:
        super().__init__()
        self.agent = agent

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
        self.query_one(HeaderBar).show(model.header(), state.paused, palette, state.title)
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
        self.query_one("#node-ranks", RanksTable).show(ranks, palette)

    def action_back(self) -> None:
        self.app.pop_screen()


class HeatMapScreen(ModelScreen):
    """Stragglers at a glance: every rank's compute time over the median rank's, step by step, grouped by node."""

    BINDINGS = [Binding("escape", "back", "Back")]

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield Static(id="heat-legend")
        heat = HeatMapView(id="heat")
        heat.border_title = "Compute time / median rank's (enter: timeline)"
        yield heat
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(HeatMapView).focus()

    def show(self, state: ViewState) -> None:
        model, palette = state.model, state.palette
        self.query_one(HeaderBar).show(model.header(), state.paused, palette, state.title)
        view = self.query_one(HeatMapView)
        heat = model.heat_map(view.step_columns())
        flags = {flag.rank: flag for flag in model.straggler_flags(active_only=True)}
        view.set_data(heat, flags, palette)
        if heat.steps:
            view.border_subtitle = f"steps {heat.steps[0]:,} .. {heat.steps[-1]:,} (newest at the right)"
        legend = Text(no_wrap=True, overflow="ellipsis")
        ratio = levels.COMPUTE_RATIO
        for glyph, level, meaning in (
            (HEAT_GLYPHS[Level.OK], Level.OK, f"< {ratio.warn:g}x"),
            (HEAT_GLYPHS[Level.WARN], Level.WARN, f"{ratio.warn:g}-{ratio.bad:g}x"),
            (HEAT_GLYPHS[Level.BAD], Level.BAD, f">= {ratio.bad:g}x"),
            (HEAT_FASTER, None, f"< {1 / ratio.warn:.2f}x (faster)"),
            (HEAT_MISSING, None, "no report"),
        ):
            legend.append(f" {glyph} ", style=f"reverse {palette.colour(level)}" if level else "reverse")
            legend.append(f" {meaning}   ")
        bar = model.stragglers.threshold
        legend.append(
            f"| flagged: busy >= {bar:.2f}x the median for {model.stragglers.config.window} steps"
            if bar != float("inf")
            else "| flags start once the noise is measured",
            style="dim",
        )
        self.query_one("#heat-legend", Static).update(legend)

    def on_heat_map_view_rank_selected(self, message: HeatMapView.RankSelected) -> None:
        self.app.push_screen(RankTimelineScreen(message.rank))

    def action_back(self) -> None:
        self.app.pop_screen()


class RankTimelineScreen(ModelScreen):
    """One rank's last steps as phase bars, beside the median rank's, on one time scale."""

    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield Static(id="timeline-summary")
        with Horizontal(id="timeline-panels"):
            rank = Static(id="timeline-rank")
            rank.border_title = f"rank {self.rank}"
            yield rank
            median = Static(id="timeline-median")
            median.border_title = "median rank (each phase's median over the ranks)"
            yield median
        yield Footer()

    def show(self, state: ViewState) -> None:
        model, palette = state.model, state.palette
        self.query_one(HeaderBar).show(model.header(), state.paused, palette, state.title)
        left = self.query_one("#timeline-rank", Static)
        right = self.query_one("#timeline-median", Static)
        steps = max(1, left.content_size.height or 20)
        timeline = model.rank_timeline(self.rank, steps)
        summary = Text(no_wrap=True, overflow="ellipsis")
        if timeline is None:
            summary.append(f"rank {self.rank} is unknown")
            self.query_one("#timeline-summary", Static).update(summary)
            return
        left.border_title = f"rank {timeline.rank} on {timeline.node}"
        if timeline.straggler is not None:
            summary.append(f"STRAGGLER{levels.MARKERS[Level.WARN]} ", style=f"bold {palette.warn}")
            summary.append(timeline.straggler.describe())
        else:
            summary.append(f"rank {timeline.rank} is not flagged as a straggler")
        summary.append("\n")
        summary.append_text(timeline_legend(palette))
        self.query_one("#timeline-summary", Static).update(summary)
        # Both sides share one scale, so equal lengths mean equal times.
        scale = timeline_scale(timeline)
        width = max(10, (left.content_size.width or 60) - 19)  # step number and total take 19 columns
        left.update(timeline_bars(timeline.steps, timeline.rank_phases, scale, width, palette))
        right.update(timeline_bars(timeline.steps, list(timeline.median_phases), scale, width, palette))

    def action_back(self) -> None:
        self.app.pop_screen()


# Every key the dashboard answers to; the help screen lists exactly these.
KEYS: tuple[tuple[str, str], ...] = (
    ("q", "quit"),
    ("esc", "back: close this screen (node, heat map, timeline, stacks, checkpoints)"),
    ("? / F1", "this help"),
    ("p", "pause / resume the view (data keeps being collected; PAUSED shows in the header)"),
    ("h", "straggler heat map: ranks x recent steps, by compute time over the median rank's, grouped by node"),
    (
        "s",
        "stacks: collect every rank's stacks now and diagnose a hang (culprit, stacks grouped, odd ones marked); "
        "s again collects anew",
    ),
    ("r", "restart the job from the newest checkpoint, after a y/n question (refused with --readonly)"),
    (
        "c",
        "checkpoints: list them, merge some (m; x cancels; space picks a step) and compare the merge's "
        "validation loss with its inputs' (m and x refused with --readonly)",
    ),
    (
        "enter",
        "on a node row (or a rank row): open that node's screen; "
        "on a rank in the heat map: its timeline beside the median rank's",
    ),
    ("up down / j k", "move in a table (left right: scroll it sideways)"),
    ("PgUp PgDn Home End", "scroll a table"),
    ("tab / shift+tab", "next / previous table"),
    ("ctrl+p", "command palette (e.g. switch to a light theme)"),
)


def help_renderable(palette: Palette, rules: StragglerConfig = DEFAULT_CONFIG) -> Group:
    keys = Table(title="Keys", title_justify="left", show_header=False, box=None, padding=(0, 2))
    keys.add_column(style="bold", no_wrap=True)
    keys.add_column()
    for key, what in KEYS:
        keys.add_row(key, what)

    colours = Table(title="Colours", title_justify="left", show_header=False, box=None, padding=(0, 2))
    colours.add_column(style="bold", no_wrap=True)
    colours.add_column()
    meaning = {Level.OK: "fine", Level.WARN: "look at it", Level.BAD: "act on it"}
    for level in Level:
        marker = levels.MARKERS[level]
        line = f"{meaning[level]}; " + (f"numbers end in {marker}" if marker else "numbers carry no marker")
        colours.add_row(Text(levels.COLOUR_NAMES[level], style=f"bold {palette.colour(level)}"), line)
    colours.add_row("", "Status words say what their colour says, so nothing is told by colour alone.")
    for threshold in levels.THRESHOLDS:
        colours.add_row(threshold.name, threshold.describe())

    def by_level(mapping: dict[str, Level | None]) -> Text:
        text = Text()
        for level in (Level.OK, Level.WARN, Level.BAD):
            names = [n for n, lv in mapping.items() if lv is level]
            if names:
                text.append(f"{levels.COLOUR_NAMES[level]}: {', '.join(names)}", style=palette.colour(level))
                text.append("   ")
        plain = [n for n, lv in mapping.items() if lv is None]
        if plain:
            text.append(f"plain: {', '.join(plain)}")
        return text

    colours.add_row("rank status", by_level(dict(levels.STATUS_LEVELS)))
    colours.add_row("connection", by_level(dict(levels.CONNECTION_LEVELS)))
    colours.add_row(
        "", f"LOST: the agent vanished (its stream broke, or sent nothing for {STALE_AFTER:g}s); DISCONNECTED: never "
        "reached, or it stopped"
    )  # fmt: skip
    colours.add_row("event severity", by_level(levels.SEVERITY_LEVELS))

    stragglers = Table(
        title="Straggler rules (dashboard/model/stragglers.py)", title_justify="left", show_header=False, box=None,
        padding=(0, 2),
    )  # fmt: skip
    stragglers.add_column(style="bold", no_wrap=True)
    stragglers.add_column()
    for name, meaning in rules.describe():
        stragglers.add_row(name, meaning)
    stragglers.add_row("", "A flag names the rank and node, its cost to the job per step, since when, and the likely "
                       "cause: compute, data, GC, host or link. It clears when the slowdown ends.")  # fmt: skip
    return Group(keys, Text(""), colours, Text(""), stragglers)


class HelpScreen(ModalScreen[None]):
    """Every key, and what green, yellow and red mean."""

    BINDINGS = [
        Binding("escape", "dismiss", "Back"),
        Binding("question_mark", "dismiss", "Close", key_display="?"),
        Binding("f1", "dismiss", "Close", show=False),
    ]

    def __init__(self, palette: Palette, rules: StragglerConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        self.palette = palette
        self.rules = rules

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            with VerticalScroll():
                yield Static(help_renderable(self.palette, self.rules), id="help-text")
            yield Static("esc, ? or F1 closes this help", id="help-hint")


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question over the dimmed screen: ``y`` answers yes, ``n`` or ``esc`` no."""

    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n", "answer(False)", "No"),
        Binding("escape", "answer(False)", "No", show=False),
    ]

    def __init__(self, question: str, detail: str = "") -> None:
        super().__init__()
        self.question = question
        self.detail = detail

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(Text(self.question, style="bold"), id="confirm-question")
            if self.detail:
                yield Static(Text(self.detail), id="confirm-detail")
            yield Static("y: yes    n or esc: no", id="confirm-hint")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)
