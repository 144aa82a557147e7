"""The Textual dashboard: connections feed the cluster model, a fixed-rate tick draws it.

Data and drawing are decoupled on purpose. Each agent's stream runs in its own worker and only updates the
``ClusterModel``; a 3 Hz timer draws the latest state of the model onto whatever screen is on top. A fast
stream therefore costs model updates, never redraws, and pausing the view (``p``) just skips the drawing
while data keeps arriving.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from textual.app import App
from textual.binding import Binding
from textual.css.query import NoMatches
from textual.reactive import reactive
from textual.screen import ModalScreen, Screen

from megascope.dashboard import formatting as fmt
from megascope.dashboard.connection import watch_agent
from megascope.dashboard.control import DashboardControl
from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.model.diagnosis import AgentStacks, job_stacks
from megascope.dashboard.model.views import SMOOTHING_WEIGHTS
from megascope.dashboard.screens.base import BACK, ModelScreen, ViewState
from megascope.dashboard.screens.checkpoints import CheckpointsScreen
from megascope.dashboard.screens.confirm import ConfirmScreen
from megascope.dashboard.screens.diagnosis import DiagnosisScreen
from megascope.dashboard.screens.heat_map import HeatMapScreen
from megascope.dashboard.screens.help import HelpScreen, KeyRow, key_rows
from megascope.dashboard.screens.main import TALL, WIDE, MainScreen
from megascope.dashboard.screens.rank_log import OpenRankLog, RankLogScreen
from megascope.dashboard.screens.replay_seek import SeekScreen, SeekTarget
from megascope.dashboard.screens.training import TrainingScreen
from megascope.dashboard.transport import PLAINTEXT, Transport
from megascope.dashboard.widgets.heat_map import HeatMapView
from megascope.dashboard.widgets.palette import Palette
from megascope.dashboard.widgets.tables import KeyedTable, NodesTable

if TYPE_CHECKING:
    from megascope.dashboard.replay import Replay

TICK_SECONDS = 1 / 3
REPLAY_SPEEDS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)
REPLAY_STEP_SECONDS = 5.0


class DashboardApp(App[int]):
    """Live view of a training cluster.

    ``agents`` are ``host:port`` addresses to watch. Pass ``model`` to draw a ready-made cluster model
    (tests, snapshots, replays); with no ``agents`` nothing is connected and the model is drawn as it is.
    """

    CSS_PATH = "app.tcss"
    # Every screen gets -narrow/-wide and -short/-tall, and app.tcss lays each out for the terminal it is in.
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (WIDE, "-wide")]
    VERTICAL_BREAKPOINTS = [(0, "-short"), (TALL, "-tall")]
    TITLE = "megascope"
    # Each binding's tooltip is its line in help (screens/help.py makes the key table from the bindings).
    BINDINGS = [
        Binding("q", "quit", "Quit", tooltip="quit"),
        # Second in the footer, so that an 80-column terminal still shows where every other key is explained.
        Binding("question_mark", "help", "Help", key_display="?", tooltip="this help"),
        Binding("f1", "help", "Help", show=False),
        Binding(
            "p", "toggle_pause", "Pause",
            tooltip="pause / resume the view (data keeps being collected; PAUSED shows in the header)",
        ),
        Binding(
            "s", "stacks", "Stacks",
            tooltip="stacks: collect every rank's stacks now and diagnose a hang (culprit, stacks grouped, odd ones "
            "marked); s again collects anew",
        ),
        Binding(
            "h", "stragglers", "Heat map",
            tooltip="straggler heat map: ranks x recent steps, by compute time over the median rank's, grouped by node",
        ),
        Binding(
            "r", "restart", "Restart",
            tooltip="restart the job from the newest checkpoint, after a y/n question (refused with --readonly)",
        ),
        Binding(
            "g", "plots", "Plots",
            tooltip="plots: loss (the mean or each rank's, a toggles), learning rate, gradient norm and the script's "
            "own scalars",
        ),
        Binding(
            "e", "smoothing", "Smoothing", show=False,
            tooltip="smoothing of the loss and gradient-norm curves: EMA 0 (raw), 0.6, 0.9, 0.99 in turn",
        ),
        Binding(
            "c", "checkpoints", "Checkpoints",
            tooltip="checkpoints: list them, merge some (m; x cancels; space picks a step) and compare the merge's "
            "validation loss with its inputs' (m and x refused with --readonly)",
        ),
        # A replay's cursor (megascope replay): offered only on a replay (check_action).
        Binding("space", "replay_play", "Play/pause", tooltip="replay: play or pause the record at the chosen speed"),
        Binding("plus", "replay_speed(1)", "Faster", key_display="+", tooltip="replay: play faster (up to 120x)"),
        Binding("minus", "replay_speed(-1)", "Slower", key_display="-", show=False, tooltip="replay: play slower"),
        Binding(
            "right_square_bracket", "replay_step(1)", "Step", key_display="]", show=False,
            tooltip=f"replay: step {REPLAY_STEP_SECONDS:g} s forward ([ steps back)",
        ),
        Binding(
            "left_square_bracket", "replay_step(-1)", "Back", key_display="[", show=False, tooltip="replay: step back"
        ),
        Binding(
            "n", "replay_incident(1)", "Next incident", tooltip="replay: jump to the next incident (crash, hang, ...)"
        ),
        Binding("N", "replay_incident(-1)", "Prev incident", show=False, tooltip="replay: the previous incident"),
        Binding(
            "t", "replay_seek", "Go to", tooltip="replay: go to a time (12:34:56, +90 from the start) or a step"
        ),
        # The binding Textual adds for its command palette, made here so that help lists it.
        Binding(
            "ctrl+p", "command_palette", "palette", show=False, priority=True,
            tooltip="command palette (e.g. switch to a light theme)",
        ),
    ]  # fmt: skip

    paused: reactive[bool] = reactive(False)
    """While True the screens keep their last frame; the model still takes in data."""
    smoothing: reactive[float] = reactive(SMOOTHING_WEIGHTS[1])
    """The EMA weight of the loss and gradient-norm curves, on every screen."""

    REPLAY_ACTIONS = frozenset({"replay_play", "replay_speed", "replay_step", "replay_incident", "replay_seek"})
    CONTROL_ACTIONS = frozenset({"restart"})
    """The app's actions that change the job: a ``--readonly`` dashboard leaves them out of the footer."""

    def __init__(
        self,
        agents: Sequence[str] = (),
        readonly: bool = False,
        *,
        model: ClusterModel | None = None,
        theme: str | None = None,
        tick_seconds: float = TICK_SECONDS,
        token: str | None = None,
        transport: Transport = PLAINTEXT,
        replay: Replay | None = None,
    ) -> None:
        super().__init__()
        self.replay = replay
        """A recorded run behind a time cursor (``megascope replay``): read-only, nothing connected."""
        self.playing = False
        self.speed = 1.0
        self._played_at = 0.0
        if replay is not None:
            model, agents, readonly = replay.model, (), True
        self.model = model if model is not None else ClusterModel()
        for address in agents:
            self.model.add_agent(address)
        self.control = DashboardControl(self.model, agents, token=token, readonly=readonly, transport=transport)
        """Every call on the agents goes through it: it holds the token and the read-only mode."""
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
        for address in self.control.agents:
            self.run_worker(
                watch_agent(self.model, address, transport=self.control.transport),
                name=f"watch {address}",
                group="agents",
                exit_on_error=False,
            )
        self.set_interval(self.tick_seconds, self.refresh_view)
        self.refresh_view()

    def _on_theme_changed(self, _theme: object) -> None:
        self.palette = Palette.from_app(self)
        if isinstance(self.screen, ModelScreen):
            self.screen.show(self.view_state())  # new colours even while paused

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Read-only: the restart is not offered (the footer leaves it out); pressing r still says why not (key_r).
        if action in self.REPLAY_ACTIONS:
            return self.replay is not None
        return not (action in self.CONTROL_ACTIONS and self.control.readonly)

    def key_r(self) -> None:
        """``r`` on a read-only dashboard, whose restart binding is off: say so rather than nothing."""
        if self.control.readonly and not isinstance(self.screen, ModalScreen):
            self.notify(self.control.refusal("no restart was sent") or "", severity="warning")

    def view_state(self) -> ViewState:
        title = "megascope (read-only)" if self.control.readonly else "megascope"
        if self.replay is not None:
            played = "playing" if self.playing else "stopped"
            title = (
                f"megascope REPLAY {time.strftime('%Y-%m-%d', time.localtime(self.replay.cursor))} "
                f"{fmt.clock(self.replay.cursor)} +{fmt.duration(self.replay.cursor - self.replay.start)} "
                f"{played} {self.speed:g}x"
            )
        return ViewState(
            model=self.model, palette=self.palette, paused=self.paused, now=self.model.clock(), title=title,
            smoothing=self.smoothing,
        )  # fmt: skip

    def _drawn_screen(self) -> Screen[object] | None:
        """The screen the tick draws: the top one, or under a modal (help, an event, a question) the one it covers,
        which shows around the modal and so keeps updating (or says PAUSED) like any other frame."""
        for screen in reversed(self.screen_stack):
            if isinstance(screen, ModelScreen):
                return screen
            if not isinstance(screen, ModalScreen):
                return None
        return None

    def refresh_view(self) -> None:
        """Draw the model on the top screen. Paused, a screen keeps its last frame (a new one gets a first)."""
        if self.replay is not None and self.playing:
            self._play()
        screen = self._drawn_screen()
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

    def on_model_screen_redraw(self, _message: ModelScreen.Redraw) -> None:
        self.refresh_view()

    def on_open_rank_log(self, message: OpenRankLog) -> None:
        if self.replay is not None:
            self.notify("a replay has no live agents to ask for a rank's output", severity="warning")
            return
        self.push_screen(RankLogScreen(self.control, message.address, message.rank))

    def watch_paused(self, paused: bool) -> None:
        screen = self._drawn_screen()
        if isinstance(screen, ModelScreen) and screen.is_mounted:
            screen.show_paused(self.view_state())

    def watch_smoothing(self, smoothing: float) -> None:
        screen = self._drawn_screen()
        if isinstance(screen, ModelScreen) and screen.is_mounted and not self.paused:
            screen.show(self.view_state())

    # -- a replay's cursor ------------------------------------------------------------------------------------

    def _play(self) -> None:
        assert self.replay is not None
        now = time.monotonic()
        elapsed, self._played_at = now - self._played_at, now
        self.seek(self.replay.cursor + elapsed * self.speed)
        if self.replay.cursor >= self.replay.end:
            self.playing = False

    def seek(self, wall_time: float) -> None:
        """Move the replay's cursor (and the model with it); the diagnosis screen shows the stacks recorded by then."""
        if self.replay is None:
            return
        self.replay.seek(wall_time)
        self.model = self.replay.model
        if isinstance(self.screen, DiagnosisScreen):
            self._show_recorded_stacks(self.screen)
        if not self.playing:
            self.refresh_view()

    def action_replay_play(self) -> None:
        assert self.replay is not None
        if not self.playing and self.replay.cursor >= self.replay.end:
            self.seek(self.replay.start)  # at the end: play again from the start
        self.playing = not self.playing
        self._played_at = time.monotonic()
        self.refresh_view()

    def action_replay_speed(self, direction: int) -> None:
        speeds = REPLAY_SPEEDS
        index = speeds.index(self.speed) if self.speed in speeds else 1
        self.speed = speeds[min(len(speeds) - 1, max(0, index + direction))]
        self.notify(f"replay speed {self.speed:g}x")
        self.refresh_view()

    def action_replay_step(self, direction: int) -> None:
        assert self.replay is not None
        self.playing = False
        self.seek(self.replay.cursor + direction * REPLAY_STEP_SECONDS)

    def action_replay_incident(self, direction: int) -> None:
        assert self.replay is not None
        item = self.replay.next_incident() if direction > 0 else self.replay.previous_incident()
        if item is None:
            self.notify(f"no {'later' if direction > 0 else 'earlier'} incident in the record", severity="warning")
            return
        self.playing = False
        self.seek(item.wall_time)
        event = item.message
        self.notify(f"{fmt.clock(item.wall_time)} {event.kind}: {event.text}", markup=False)  # type: ignore[attr-defined]

    def action_replay_seek(self) -> None:
        assert self.replay is not None
        if isinstance(self.screen, ModalScreen):
            return
        replay = self.replay

        def chosen(target: SeekTarget | None) -> None:
            if target is None:
                return
            wall_time = target.wall_time
            if target.step is not None:
                wall_time = replay.time_of_step(target.step)
                if wall_time is None:
                    self.notify(f"the record never reaches step {target.step:,}", severity="warning")
                    return
            assert wall_time is not None
            self.playing = False
            self.seek(wall_time)

        self.push_screen(SeekScreen(replay.start), chosen)

    def _show_recorded_stacks(self, screen: DiagnosisScreen) -> None:
        assert self.replay is not None
        stacks = self.replay.stacks_at()
        if stacks is None:
            screen.set_collecting(f"no stacks were recorded by {fmt.clock(self.replay.cursor)} (a replay shows those "
                                  "its agents collected: at a hang, or when someone pressed s)")  # fmt: skip
        else:
            screen.set_stacks(stacks)

    def action_toggle_pause(self) -> None:
        self.paused = not self.paused

    def action_smoothing(self) -> None:
        weights = SMOOTHING_WEIGHTS
        index = weights.index(self.smoothing) if self.smoothing in weights else 0
        self.smoothing = weights[(index + 1) % len(weights)]
        self.notify(f"smoothing: {'EMA ' + format(self.smoothing, 'g') if self.smoothing else 'off (raw curves)'}")

    def action_plots(self) -> None:
        if not isinstance(self.screen, TrainingScreen | ModalScreen):
            self.push_screen(TrainingScreen())

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.palette, help_keys(self.replay is not None), self.model.stragglers.config))

    def action_stragglers(self) -> None:
        if not isinstance(self.screen, HeatMapScreen | ModalScreen):
            self.push_screen(HeatMapScreen())

    def action_checkpoints(self) -> None:
        """The run's checkpoints, merging them and the merge's result (the screen talks to the agents)."""
        if not isinstance(self.screen, CheckpointsScreen | ModalScreen):
            self.push_screen(CheckpointsScreen(self.control))

    def action_stacks(self) -> None:
        """Open the diagnosis screen (or stay on it) and collect every rank's stacks anew."""
        if isinstance(self.screen, ModalScreen):
            return
        if isinstance(self.screen, DiagnosisScreen):
            screen = self.screen
        else:
            screen = DiagnosisScreen()
            self.push_screen(screen)
        if self.replay is not None:  # the stacks recorded at the cursor, not the processes of today
            self._show_recorded_stacks(screen)
            return
        # DumpStacks is a control call (the agent signals every rank): --readonly sends none.
        refused = self.control.refusal("stacks are not collected; hang diagnoses still show here")
        if refused is not None:
            screen.set_collecting(refused)
            return
        addresses = self.control.connected_agents()
        if not addresses:
            screen.set_collecting("no agent is connected: no stacks to collect")
            return
        screen.set_collecting(f"collecting stacks from {len(addresses)} agent{'s' if len(addresses) != 1 else ''} ...")
        # exclusive: pressing s again while one collection runs starts over rather than racing it.
        self.run_worker(self._collect_stacks(screen, addresses), group="stacks", exclusive=True, exit_on_error=False)

    async def _collect_stacks(self, screen: DiagnosisScreen, addresses: list[str]) -> None:
        asked = self.model.clock()
        replies = await self.control.dump_stacks(addresses)
        nodes = {row.agent: row.node for row in self.model.node_rows()}
        stacks = job_stacks(
            [AgentStacks(r.address, nodes.get(r.address, r.address), r.reply, r.error) for r in replies],
            asked,
            stalled=self.model.stalled() or any(row.status.value == "HUNG" for row in self.model.rank_rows()),
        )
        screen.set_stacks(stacks)

    def action_restart(self) -> None:
        """Ask, then have every connected agent stop its ranks so the job restarts from the newest checkpoint."""
        if isinstance(self.screen, ModalScreen):
            return
        refused = self.control.refusal("no restart was sent")
        if refused is not None:
            self.notify(refused, severity="warning")
            return
        if not self.control.connected_agents():
            self.notify("no agent is connected: there is nothing to restart", severity="error")
            return
        step = self.model.newest_checkpoint_step()
        where = f"checkpoint step {step:,}" if step is not None else "the newest checkpoint"
        question = f"Restart the job from {where}? y/n"
        detail = (
            "Every connected agent stops its ranks; torch elastic starts them again and they resume from the "
            "newest committed checkpoint. Steps after it are done again."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                # The agents connected now, not when the question was asked.
                self.run_worker(self._restart(self.control.connected_agents()), group="control", exit_on_error=False)

        self.push_screen(ConfirmScreen(question, detail), answered)

    async def _restart(self, addresses: list[str]) -> None:
        replies = await self.control.restart(addresses)
        # An agent's message can hold brackets (IPv6 addresses, reprs): never read as markup.
        for reply in replies:
            if reply.reply is None:
                self.notify(
                    f"{reply.address}: restart refused: {reply.error}", severity="error", markup=False, timeout=15
                )
        done = [r.reply for r in replies if r.reply is not None]
        if done:
            steps = ", ".join(str(s) for s in sorted({r.step for r in done}))
            stopped = sum(r.ranks_stopped for r in done)
            self.notify(
                f"restart requested: {stopped} rank{'s' if stopped != 1 else ''} stopped on {len(done)} of "
                f"{len(replies)} agents; resuming from step {steps}",
                markup=False,
            )


def help_keys(replay: bool = False) -> list[KeyRow]:
    """The help's key table: the app's bindings, then those of its screens and widgets, then moving around. The
    replay's keys only on a replay (live, they do nothing)."""
    return key_rows(
        [
            *(
                b
                for b in DashboardApp.BINDINGS
                if replay or not (isinstance(b, Binding) and b.action.startswith("replay_"))
            ),
            *MainScreen.BINDINGS,
            BACK,
            *(b for b in TrainingScreen.BINDINGS if b is not BACK),
            *NodesTable.BINDINGS,
            *(b for b in HeatMapView.BINDINGS if isinstance(b, Binding) and b.show),
            *(b for b in CheckpointsScreen.BINDINGS if b is not BACK),
            *KeyedTable.BINDINGS,
            # Textual's own: from one table to the next.
            *(b for b in Screen.BINDINGS if isinstance(b, Binding) and b.action.startswith("app.focus_")),
        ]
    )
