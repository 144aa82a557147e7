"""Training curves (``g``): loss (the mean, or every rank's), learning rate, gradient norm, and the script's own
scalars, smoothed as TensorBoard smooths them (``e`` changes the smoothing, on every screen)."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.widgets import Footer

from megascope.dashboard.model.views import ema
from megascope.dashboard.screens.base import BACK, ModelScreen, ViewState
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.palette import Palette
from megascope.dashboard.widgets.plot import Plot, Series

GLYPHS = "•+x*o#%@"
"""One per rank (cycling): the curves differ without colour."""
SCALAR_PLOTS = 4
"""The script's own scalars drawn (the first by name); the rest are listed in the last plot's title."""


def _step(value: float) -> str:
    return f"step {value:,.0f}"


def _number(value: float) -> str:
    return f"{value:.3g}"


class TrainingScreen(ModelScreen):
    """Loss, learning rate, gradient norm and the script's scalars over the steps the dashboard keeps."""

    BINDINGS = [
        BACK,
        Binding("a", "toggle_ranks", "Per rank", tooltip="plots screen: every rank's loss curve, or their mean"),
    ]

    def __init__(self) -> None:
        super().__init__()
        self.per_rank = False

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        with Grid(id="training-plots"):
            for plot_id, title in (("t-loss", "loss"), ("t-lr", "learning rate"), ("t-grad", "gradient norm")):
                plot = Plot(id=plot_id, y_format=_number, x_format=_step)
                plot.border_title = title
                yield plot
            for i in range(SCALAR_PLOTS):
                plot = Plot(id=f"t-scalar{i}", y_format=_number, x_format=_step, classes="scalar")
                plot.display = False
                yield plot
        yield Footer()

    def action_toggle_ranks(self) -> None:
        self.per_rank = not self.per_rank
        self.request_redraw()

    def show(self, state: ViewState) -> None:
        self.show_header(state)
        series, weight, palette = state.model.training_series(), state.smoothing, state.palette
        smoothing = f"EMA {weight:g}" if weight else "raw"
        loss = self.query_one("#t-loss", Plot)
        if self.per_rank:
            lines = [
                Series(f"rank {rank}", _xy(ema(points, weight)), GLYPHS[i % len(GLYPHS)], _style(i, palette))
                for i, (rank, points) in enumerate(series.loss_by_rank.items())
            ]
            loss.border_title = f"loss of each rank ({smoothing}; a: the mean)"
            loss.border_subtitle = "  ".join(f"{s.glyph} {s.label}" for s in lines)
        else:
            lines = [Series("raw", _xy(series.loss), "·", "dim")] if weight else []
            lines.append(Series(smoothing, _xy(ema(series.loss, weight)), "•", ""))
            loss.border_title = f"loss, mean over ranks ({smoothing}; a: each rank)"
            loss.border_subtitle = "· raw  • smoothed" if weight else ""
        loss.set_lines(lines)
        # The learning rate is a schedule, not a noisy measurement: never smoothed.
        self.query_one("#t-lr", Plot).set_lines([Series("lr", _xy(series.lr), "•", "")])
        grad = self.query_one("#t-grad", Plot)
        grad.border_title = f"gradient norm (mean over ranks; {smoothing})"
        grad.set_lines(
            ([Series("raw", _xy(series.grad_norm), "·", "dim")] if weight else [])
            + [Series(smoothing, _xy(ema(series.grad_norm, weight)), "•", "")]
        )
        names = list(series.scalars)
        for i, plot in enumerate(self.query(".scalar").results(Plot)):
            plot.display = i < len(names)
            if i < len(names):
                plot.border_title = f"{names[i]} ({smoothing})"
                plot.set_lines([Series(names[i], _xy(ema(series.scalars[names[i]], weight)), "•", "")])
                if i == SCALAR_PLOTS - 1 and len(names) > SCALAR_PLOTS:
                    plot.border_subtitle = f"not drawn: {', '.join(names[SCALAR_PLOTS:])}"


def _xy(points: list[tuple[int, float]]) -> list[tuple[float, float]]:
    return [(float(step), value) for step, value in points]


def _style(index: int, palette: Palette) -> str:
    return ("", palette.ok, palette.warn, palette.bad)[index % 4]
