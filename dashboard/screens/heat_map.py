"""The straggler heat map (``h``): every rank's compute time over the median rank's, step by step, by node."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Footer, Static

from megascope.dashboard import levels
from megascope.dashboard.levels import Level
from megascope.dashboard.screens.base import BACK, ModelScreen, ViewState
from megascope.dashboard.screens.timeline import RankTimelineScreen
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.heat_map import HEAT_FASTER, HEAT_GLYPHS, HEAT_MISSING, HeatMapView


class HeatMapScreen(ModelScreen):
    """Stragglers at a glance: every rank's compute time over the median rank's, step by step, grouped by node."""

    BINDINGS = [BACK]

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
        self.show_header(state)
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
