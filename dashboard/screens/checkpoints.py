"""The checkpoints screen (``c``): a run's committed checkpoints, merging them (PMA), and the merge's result.

All agents of a job share the run's checkpoint directory, so the screen works with one agent at a time: the
first that has a checkpoint directory (``n`` moves to the next). The table lists its checkpoints (step, when
saved, size, the ranks that saved it, validation loss when known) and the merges beside them. The form on the
right names the inputs (``last 4``, ``100-200``, ...; space on a row adds or removes that step), the method,
EMA's alpha, and whether to measure validation losses; ``m`` (or enter in the form) starts the merge on the
agent and follows its progress stream; ``x`` cancels it. At the end the merge's validation loss is drawn
against its inputs'. A ``--readonly`` dashboard refuses ``m`` and ``x`` and sends nothing.

Calls go through the dashboard's control object (:mod:`megascope.dashboard.control`, handed to the screen), in
workers of this screen; what they bring is kept here and drawn on the app's redraw tick, like every other screen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import grpc
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import Checkbox, DataTable, Footer, Input, ProgressBar, Select, Static

from megascope.dashboard import formatting as fmt
from megascope.dashboard.connection import describe_error
from megascope.dashboard.control import DashboardControl
from megascope.dashboard.levels import Level
from megascope.dashboard.model.checkpoints import (
    DEFAULT_ALPHA,
    DEFAULT_INPUTS,
    METHODS,
    Inputs,
    InputsError,
    merge_request,
    parse_inputs,
    toggle_step,
    val_loss_chart,
)
from megascope.dashboard.screens.base import BACK, ModelScreen, ViewState
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.palette import Palette, cell, word
from megascope.dashboard.widgets.tables import KeyedTable
from megascope.protos.megascope.v1 import agent_pb2

LIST_EVERY_SECONDS = 5.0
"""How often the listing is read again while the screen is open (new checkpoints, retention)."""
POLL_SECONDS = 0.5
"""How often a merge this screen is not streaming (started elsewhere, or before the screen opened) is polled."""
_STATES = {
    agent_pb2.MERGE_STATE_RUNNING: ("RUNNING", None),
    agent_pb2.MERGE_STATE_DONE: ("DONE", Level.OK),
    agent_pb2.MERGE_STATE_FAILED: ("FAILED", Level.BAD),
    agent_pb2.MERGE_STATE_CANCELLED: ("CANCELLED", Level.WARN),
}


class CheckpointsTable(KeyedTable):
    COLUMNS = (
        ("use", "use", 3),
        ("step", "step", 9),
        ("saved", "saved", 19),
        ("size", "size", 9),
        ("world", "ranks", 5),
        ("val_loss", "val loss", 9),
        ("kind", "kind", 6),
        ("path", "path", 24),
    )
    FLEX_COLUMN = "path"


def checkpoint_cells(info: agent_pb2.CheckpointInfo, used: bool) -> list[Text]:
    return [
        cell("✓" if used else "", right=False),
        cell(fmt.number(info.step)),
        cell(time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.wall_time)), right=False),
        cell(fmt.size(info.size_bytes)),
        cell(str(info.world_size)),
        cell(fmt.loss(info.val_loss if info.HasField("val_loss") else None)),
        cell("merge" if info.merged else "train", right=False),
        Text(info.path, no_wrap=True, overflow="ellipsis"),
    ]


class CheckpointsScreen(ModelScreen):
    """Checkpoints of the run, merges, and the last merge's result."""

    BINDINGS = [
        BACK,
        Binding(
            "m",
            "merge",
            "Merge",
            tooltip="checkpoints screen: merge the steps the form names (refused with --readonly)",
        ),
        Binding(
            "x",
            "cancel_merge",
            "Cancel merge",
            tooltip="checkpoints screen: cancel the running merge (refused with --readonly)",
        ),
        Binding(
            "n", "next_agent", "Next agent", tooltip="checkpoints screen: the next agent with a checkpoint directory"
        ),
        Binding(
            "space", "toggle_step", "Use/skip step", tooltip="checkpoints screen: use or skip the step under the cursor"
        ),
    ]

    def __init__(self, control: DashboardControl) -> None:
        super().__init__()
        self.control = control
        self.listings: dict[str, agent_pb2.ListCheckpointsResponse] = {}
        """The latest listing of each agent that answered."""
        self.errors: dict[str, str] = {}
        self.agent: str | None = None
        """The agent merges go to: the first with a checkpoint directory, until ``n`` picks another."""
        self.progress: agent_pb2.MergeProgress | None = None
        """The newest state of that agent's running or last merge."""
        self.inputs: Inputs | None = None
        self.problem = ""
        """Why the form's values make no merge (shown under the form), or empty."""
        self._listed = False
        self._listing = False

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield Static(id="ckpt-where")
        with Horizontal(id="ckpt-top"):
            table = CheckpointsTable(id="ckpt-table")
            table.border_title = "Checkpoints (space: use / skip a step)"
            yield table
            with Vertical(id="merge-form") as form:
                form.border_title = "Merge (PMA)"
                yield Static(Text("inputs: last N [every V] | A-B | A, B, C"), classes="merge-label")
                yield Input(DEFAULT_INPUTS, id="merge-inputs")
                yield Static("method", classes="merge-label")
                yield Select([(m, m) for m in METHODS], value="sma", allow_blank=False, id="merge-method")
                yield Static("alpha (ema only)", classes="merge-label")
                yield Input(str(DEFAULT_ALPHA), id="merge-alpha", disabled=True)
                yield Checkbox("measure validation losses", True, id="merge-eval")
                yield Static(id="merge-preview")
        with Horizontal(id="merge-bottom"):
            with Vertical(id="merge-run") as run:
                run.border_title = "Merge"
                yield ProgressBar(id="merge-bar", show_eta=False)
                yield Static(id="merge-status")
            result = Static(id="merge-result")
            result.border_title = "Result"
            yield result
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(CheckpointsTable).focus()
        self._list_again()
        self.set_interval(LIST_EVERY_SECONDS, self._list_again)

    def _list_again(self) -> None:
        # Never on top of a listing still waiting for a slow agent: that one would be cancelled, and so on.
        if not self._listing:
            self._listing = True
            self.run_worker(self._list(), group="list", exit_on_error=False)

    # -- talking to the agents -----------------------------------------------------------------------------

    def _addresses(self) -> list[str]:
        """The connected agents (all of them while none is yet: the screen may open before the first answer)."""
        return self.control.reachable_agents()

    async def _list(self) -> None:
        first = not self._listed
        try:
            replies = await self.control.list_checkpoints(self._addresses())
        finally:
            self._listing = False
        for reply in replies:
            if reply.reply is not None:
                self.listings[reply.address] = reply.reply
                self.errors.pop(reply.address, None)
            else:
                self.errors[reply.address] = reply.error
        self._listed = True
        if self.agent is None or self.agent not in self.listings:
            self.agent = next((a for a in self._addresses() if self.listings.get(a, _EMPTY).directory), None)
        self._update_preview()
        self._redraw()
        if first and self.agent is not None:
            # A merge already running (started before this screen, or by another dashboard): follow it.
            self.run_worker(self._poll(self.agent), group="poll", exclusive=True, exit_on_error=False)

    async def _poll(self, address: str) -> None:
        """Follow the agent's merge through GetMergeStatus until it ends (no stream of ours is on it)."""
        while True:
            try:
                progress = await self.control.merge_status(address)
            except grpc.aio.AioRpcError:
                return  # the listing's errors say the agent is unreachable
            if address != self.agent:
                return
            self.progress = progress if progress.state != agent_pb2.MERGE_STATE_UNSPECIFIED else self.progress
            self._redraw()
            if progress.state != agent_pb2.MERGE_STATE_RUNNING:
                return
            await asyncio.sleep(POLL_SECONDS)

    async def _merge(self, address: str, request: agent_pb2.StartMergeRequest) -> None:
        try:
            async for progress in self.control.start_merge(address, request):
                self.progress = progress
                self._redraw()
        except grpc.aio.AioRpcError as error:
            self.notify(f"merge refused: {describe_error(error)}", severity="error", markup=False, timeout=15)
            return
        end = self.progress
        if end is not None and end.state == agent_pb2.MERGE_STATE_FAILED:
            self.notify(f"merge failed: {end.message}", severity="error", markup=False, timeout=15)
        await self._list()  # the merge is listed now

    async def _cancel(self, address: str) -> None:
        try:
            cancelled = await self.control.cancel_merge(address)
        except grpc.aio.AioRpcError as error:
            self.notify(f"cancel refused: {describe_error(error)}", severity="error", markup=False)
            return
        self.notify("cancelling the merge" if cancelled else "no merge is running", markup=False)

    # -- keys and the form ---------------------------------------------------------------------------------

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # Read-only: merge and cancel are not offered (the footer leaves them out); the keys still say why not.
        return not (self.control.readonly and action in ("merge", "cancel_merge"))

    def key_m(self) -> None:
        if self.control.readonly:
            self.action_merge()

    def key_x(self) -> None:
        if self.control.readonly:
            self.action_cancel_merge()

    def action_merge(self) -> None:
        refused = self.control.refusal("no merge was started")
        if refused is not None:
            self.notify(refused, severity="warning")
            return
        if self.agent is None:
            self.notify("no agent with a checkpoint directory: nothing to merge", severity="error")
            return
        if self.progress is not None and self.progress.state == agent_pb2.MERGE_STATE_RUNNING:
            self.notify("a merge is running: wait for it, or x cancels it", severity="warning")
            return
        try:
            inputs = parse_inputs(self.query_one("#merge-inputs", Input).value, self._committed())
            method = str(self.query_one("#merge-method", Select).value)
            alpha = self.query_one("#merge-alpha", Input).value
            request = merge_request(inputs, method, alpha, self.query_one("#merge-eval", Checkbox).value)
        except InputsError as error:
            self.notify(str(error), severity="error", markup=False)
            return
        self.progress = agent_pb2.MergeProgress(state=agent_pb2.MERGE_STATE_RUNNING, message="asking the agent")
        self._redraw()
        self.run_worker(self._merge(self.agent, request), group="merge", exclusive=True, exit_on_error=False)

    def action_cancel_merge(self) -> None:
        refused = self.control.refusal("no cancel was sent")
        if refused is not None:
            self.notify(refused, severity="warning")
            return
        if self.agent is not None:
            self.run_worker(self._cancel(self.agent), group="control", exit_on_error=False)

    def action_next_agent(self) -> None:
        with_dirs = [a for a in self._addresses() if self.listings.get(a, _EMPTY).directory]
        if len(with_dirs) < 2 or self.agent not in with_dirs:
            self.notify("no other agent has a checkpoint directory", markup=False)
            return
        self.agent = with_dirs[(with_dirs.index(self.agent) + 1) % len(with_dirs)]
        self.progress = None
        self._update_preview()
        self._redraw()
        self.run_worker(self._poll(self.agent), group="poll", exclusive=True, exit_on_error=False)

    def action_toggle_step(self) -> None:
        key = self.query_one(CheckpointsTable).selected_key()
        if key is None or not key.startswith("step:"):
            return
        field = self.query_one("#merge-inputs", Input)
        field.value = toggle_step(field.value, int(key.removeprefix("step:")), self._committed())

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.action_merge()

    def on_input_changed(self, event: Input.Changed) -> None:
        self._update_preview()
        self._redraw()

    def on_select_changed(self, event: Select.Changed) -> None:
        self.query_one("#merge-alpha", Input).disabled = event.value != "ema"
        self._update_preview()

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_toggle_step()  # enter on a row does what space does

    def _committed(self) -> list[int]:
        listing = self.listings.get(self.agent or "")
        return [c.step for c in listing.checkpoints] if listing is not None else []

    def _update_preview(self) -> None:
        if not self.is_mounted:
            return
        try:
            self.inputs = parse_inputs(self.query_one("#merge-inputs", Input).value, self._committed())
            self.problem = ""
        except InputsError as error:
            self.inputs, self.problem = None, str(error)

    def _redraw(self) -> None:
        if self.is_mounted:
            self.request_redraw()

    # -- drawing -------------------------------------------------------------------------------------------

    def show(self, state: ViewState) -> None:
        self.show_header(state)
        self._draw(state.palette)

    def show_paused(self, state: ViewState) -> None:
        # The listing and a merge are what the user asked for, not live figures: drawn even while paused.
        super().show_paused(state)
        self._draw(state.palette)

    def _draw(self, palette: Palette) -> None:
        listing = self.listings.get(self.agent or "")
        self.query_one("#ckpt-where", Static).update(self._where(listing, palette))
        used = set(self.inputs.picks(self._committed())) if self.inputs is not None else set()
        rows = []
        if listing is not None:
            rows += [(f"step:{c.step}", checkpoint_cells(c, c.step in used)) for c in listing.checkpoints]
            rows += [(f"merge:{m.path}", checkpoint_cells(m, False)) for m in listing.merged]
        self.query_one(CheckpointsTable).set_rows(rows)
        self.query_one("#merge-preview", Static).update(self._preview(palette))
        self._draw_progress(palette)
        self.query_one("#merge-result", Static).update(self._result(palette))

    def _where(self, listing: agent_pb2.ListCheckpointsResponse | None, palette: Palette) -> Text:
        text = Text(no_wrap=True, overflow="ellipsis")
        if not self._listed:
            return text.append("asking the agents for their checkpoints ...", style="italic")
        if listing is None or self.agent is None:
            text.append(self._why_none(), style=palette.warn)
        else:
            text.append(f"{self.agent}: ", style="bold")
            counts = f"{len(listing.checkpoints)} checkpoint(s), {len(listing.merged)} merge(s)"
            text.append(f"{listing.directory}  {counts}")
            others = sum(1 for a, r in self.listings.items() if r.directory and a != self.agent)
            if others:
                text.append(f"   n: next agent ({others} more)", style="dim")
        for address, error in self.errors.items():
            text.append(f"   {address}: {error}", style=palette.bad)
        if self.control.readonly:
            text.append("   read-only: m and x are off", style=palette.warn)
        return text

    def _why_none(self) -> str:
        """Why no checkpoints are listed: only an agent that answered can say it has no checkpoint directory."""
        if any(not reply.directory for reply in self.listings.values()):
            return "no agent has a checkpoint directory (start the run with --ckpt-dir)"
        if self.errors:
            return "no agent answered (each one's reason follows)"
        return "no agent is connected: checkpoints are listed once one answers"

    def _preview(self, palette: Palette) -> Text:
        if self.problem:
            return Text(self.problem, style=palette.bad)
        if self.inputs is None:
            return Text("")
        picks = self.inputs.picks(self._committed())
        text = Text(f"merges steps {', '.join(f'{s:,}' for s in picks)} ({len(picks)} checkpoints)\n")
        text.append("m or enter: merge   x: cancel", style="dim")
        return text

    def _draw_progress(self, palette: Palette) -> None:
        progress, bar = self.progress, self.query_one("#merge-bar", ProgressBar)
        status = self.query_one("#merge-status", Static)
        if progress is None:
            bar.update(total=None, progress=0)
            status.update(Text("no merge yet", style="dim"))
            return
        if progress.tensors_total:
            bar.update(total=progress.tensors_total, progress=progress.tensors_done)
        elif progress.state == agent_pb2.MERGE_STATE_DONE:
            bar.update(total=1, progress=1)
        name, level = _STATES.get(progress.state, ("-", None))
        text = Text(no_wrap=False)
        text.append_text(word(name, level, palette))
        if progress.steps:
            text.append(f" {progress.method} of steps {', '.join(f'{s:,}' for s in progress.steps)}")
        text.append(f"\n{progress.message}")
        if progress.bytes_total:
            text.append(f" ({fmt.size(progress.bytes_done)} of {fmt.size(progress.bytes_total)} read)", style="dim")
        if progress.out:
            text.append(f"\n-> {progress.out}", style="dim")
        status.update(text)

    def _result(self, palette: Palette) -> Text:
        progress = self.progress
        if progress is None or progress.state != agent_pb2.MERGE_STATE_DONE:
            return Text("the merge's validation loss is drawn here against its inputs'", style="dim")
        inputs = dict(progress.input_val_losses)
        if not inputs:  # a merge without --eval: the losses the run reported, where it did
            known = {c.step: c.val_loss for c in self._listed_checkpoints() if c.HasField("val_loss")}
            inputs = {s: known[s] for s in progress.steps if s in known}
        width = self.query_one("#merge-result", Static).content_size.width or 60
        merged = progress.val_loss if progress.HasField("val_loss") else None
        return val_loss_chart(inputs, merged, width, palette.ok)

    def _listed_checkpoints(self) -> Sequence[agent_pb2.CheckpointInfo]:
        listing = self.listings.get(self.agent or "")
        return listing.checkpoints if listing is not None else ()


_EMPTY = agent_pb2.ListCheckpointsResponse()
