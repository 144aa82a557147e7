"""What every screen that draws the cluster model shares: the state of one frame, and how it is asked for.

Screens draw a ``ViewState`` the app hands them on its redraw tick (``show``); they never read the network, and
they reach the app only through messages (``ModelScreen.Redraw``) and what they were given when made.
"""

from __future__ import annotations

from dataclasses import dataclass

from textual.binding import Binding
from textual.message import Message
from textual.screen import Screen

from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.palette import Palette

BACK = Binding(
    "escape", "back", "Back", tooltip="back: close this screen (node, heat map, timeline, stacks, checkpoints)"
)
"""The binding of every screen opened over the main one."""


@dataclass(frozen=True)
class ViewState:
    """Everything a screen needs to draw one frame."""

    model: ClusterModel
    palette: Palette
    paused: bool
    now: float
    title: str
    smoothing: float = 0.6
    """The EMA weight of the loss and gradient-norm curves (``e`` changes it); 0 draws them raw."""


class ModelScreen(Screen[None]):
    """A screen the redraw tick updates."""

    class Redraw(Message):
        """Draw the model on the top screen now rather than at the next tick (the app does it)."""

    frames_drawn = 0

    def show(self, state: ViewState) -> None:
        raise NotImplementedError

    def show_header(self, state: ViewState) -> None:
        self.query_one(HeaderBar).show(
            state.model.header(), state.paused, state.palette, state.title, faults=len(state.model.faults())
        )

    def show_paused(self, state: ViewState) -> None:
        """Paused: only the badge changes, the figures stay as they were."""
        self.query_one(HeaderBar).set_paused(state.paused, state.palette)

    def request_redraw(self) -> None:
        self.post_message(self.Redraw())

    def on_screen_resume(self) -> None:
        # On top again (just opened, or a screen above it closed): draw now rather than at the next tick.
        self.request_redraw()

    def action_back(self) -> None:
        self.app.pop_screen()
