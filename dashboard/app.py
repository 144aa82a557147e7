"""The Textual dashboard: connections feed the cluster model, a fixed-rate tick draws it.

Data and drawing are decoupled on purpose. Each agent's stream runs in its own worker and only updates the
``ClusterModel``; a 3 Hz timer draws the latest state of the model onto whatever screen is on top. A fast
stream therefore costs model updates, never redraws, and pausing the view (``p``) just skips the drawing
while data keeps arriving.
"""

from __future__ import annotations

from collections.abc import Sequence

from textual.app import App
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.screen import Screen

from megascope.dashboard.cluster import ClusterModel
from megascope.dashboard.connection import watch_agent
from megascope.dashboard.screens import HeatMapScreen, HelpScreen, MainScreen, ModelScreen, ViewState
from megascope.dashboard.widgets import Palette

TICK_SECONDS = 1 / 3


class DashboardApp(App[int]):
    """Live view of a training cluster.

    ``agents`` are ``host:port`` addresses to watch. Pass ``model`` to draw a ready-made cluster model
    (tests, snapshots, replays); with no ``agents`` nothing is connected and the model is drawn as it is.
    """

    CSS_PATH = "app.tcss"
    TITLE = "megascope"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("p", "toggle_pause", "Pause"),
        Binding("s", "stragglers", "Stragglers"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("f1", "help", "Help", show=False),
    ]

    paused: reactive[bool] = reactive(False)
    """While True the screens keep their last frame; the model still takes in data."""

    def __init__(
        self,
        agents: Sequence[str] = (),
        readonly: bool = False,
        *,
        model: ClusterModel | None = None,
        theme: str | None = None,
        tick_seconds: float = TICK_SECONDS,
    ) -> None:
        super().__init__()
        self.agents = list(agents)
        self.readonly = readonly
        self.model = model if model is not None else ClusterModel()
        for address in self.agents:
            self.model.add_agent(address)
        self.tick_seconds = tick_seconds
        self.frames = 0
        """Frames drawn so far (tests use it to wait for a redraw)."""
        if theme is not None:
            self.theme = theme
        self.palette = Palette.from_app(self)

    def get_default_screen(self) -> Screen[None]:
        return MainScreen()

    def on_mount(self) -> None:
        self.theme_changed_signal.subscribe(self, self._on_theme_changed)
        # grpc.aio channels bind to the loop that creates them: the workers create theirs in this loop.
        for address in self.agents:
            self.run_worker(
                watch_agent(self.model, address), name=f"watch {address}", group="agents", exit_on_error=False
            )
        self.set_interval(self.tick_seconds, self.refresh_view)
        self.refresh_view()

    def _on_theme_changed(self, _theme: object) -> None:
        self.palette = Palette.from_app(self)
        if isinstance(self.screen, ModelScreen):
            self.screen.show(self.view_state())  # new colours even while paused

    def view_state(self) -> ViewState:
        title = "megascope (read-only)" if self.readonly else "megascope"
        return ViewState(
            model=self.model, palette=self.palette, paused=self.paused, now=self.model.clock(), title=title
        )

    def refresh_view(self) -> None:
        """Draw the model on the top screen. Paused, a screen keeps its last frame (a new one gets a first)."""
        screen = self.screen
        if not isinstance(screen, ModelScreen) or not screen.is_mounted:
            return
        state = self.view_state()
        try:
            if self.paused and screen.frames_drawn:
                screen.show_paused(state)
                return
            screen.show(state)
        except NoMatches:
            return  # a tick that lands while the app tears the screen down (quitting): nothing left to draw
        screen.frames_drawn += 1
        self.frames += 1

    def watch_paused(self, paused: bool) -> None:
        if isinstance(self.screen, ModelScreen) and self.screen.is_mounted:
            self.screen.show_paused(self.view_state())

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.palette, self.model.stragglers.config))

    def action_stragglers(self) -> None:
        if not isinstance(self.screen, HeatMapScreen | HelpScreen):
            self.push_screen(HeatMapScreen())
