"""One rank's last steps as phase bars beside the median rank's (``enter`` on a rank in the heat map)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Footer, Static

from megascope.dashboard import levels
from megascope.dashboard.levels import Level
from megascope.dashboard.screens.base import BACK, ModelScreen, ViewState
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.timeline import timeline_bars, timeline_legend, timeline_scale


class RankTimelineScreen(ModelScreen):
    """One rank's last steps as phase bars, beside the median rank's, on one time scale."""

    BINDINGS = [BACK]

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
        self.show_header(state)
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
