"""One rank's output, live (``l`` on a rank): the newest lines it wrote to stdout and stderr.

The lines come from the agent of the rank's node (``GetRankLog``, a read: sent with ``--readonly`` too, with the
token to agents started with ``--token-reads``), which has them from the rank's guard. The screen asks again about
once a second and appends only the lines it has not shown (the agent numbers them); it follows the end unless the
user scrolled up, and follows again once they scroll back to the end (or press ``end``). What stands in the way (an
unknown rank, an agent that cannot be reached, one too old for the call) is one line above the lines.
"""

from __future__ import annotations

import grpc
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.message import Message
from textual.widgets import DataTable, Footer, RichLog, Static

from megascope.dashboard.connection import describe_error
from megascope.dashboard.control import DashboardControl
from megascope.dashboard.screens.base import BACK, ModelScreen, ViewState
from megascope.dashboard.widgets.header import HeaderBar
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

POLL_SECONDS = 1.0
"""How often the screen asks the agent for new lines."""
LINES_ASKED = 500
"""Lines asked for at each poll (the newest): more than a rank's guard sends in a second."""
LINES_KEPT = 5000
"""Lines the screen holds at most (the oldest go), so a chatty rank never grows the dashboard."""
STDERR_MARK = "! "
"""Before each stderr line: the stream is told by a mark, not by colour alone."""
PLAIN_MARK = "  "

LOG_BINDING = Binding(
    "l", "rank_log", "Log",
    tooltip="log: the stdout/stderr tail of the rank under the cursor, live",
)  # fmt: skip
"""``l`` on a screen with a rank table (main, node)."""


class OpenRankLog(Message):
    """Open rank ``rank``'s log, from the agent at ``address`` (the app does: it holds the calls to the agents)."""

    def __init__(self, address: str, rank: int) -> None:
        super().__init__()
        self.address = address
        self.rank = rank


def rank_under_cursor(table: DataTable[object]) -> int | None:
    """The rank of the row under a rank table's cursor (rows are keyed by rank); None when the table is empty."""
    if table.row_count == 0:
        return None
    try:
        key = table.coordinate_to_cell_key(table.cursor_coordinate).row_key.value
    except Exception:  # noqa: BLE001 (a cursor past the rows, while the table redraws)
        return None
    return int(key) if key is not None and key.isdigit() else None


def problem_text(error: grpc.aio.AioRpcError, rank: int, address: str) -> str:
    """Why there are no (new) lines, in one line a person can act on."""
    code = error.code()
    if code == grpc.StatusCode.NOT_FOUND:
        return f"rank {rank} is not on the agent at {address}: {error.details()}"
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return (
            f"the agent at {address} is too old to send rank logs (no GetRankLog): upgrade megascope on that node "
            "and restart its agent"
        )
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return f"the agent at {address} refused rank {rank}: {error.details()}"
    return f"the agent at {address} cannot be reached: {describe_error(error)}"


def line_text(line: telemetry_pb2.LogLine) -> Text:
    if line.stream == telemetry_pb2.LOG_STREAM_STDERR:
        return Text(STDERR_MARK + line.text, style="red")
    if line.stream == telemetry_pb2.LOG_STREAM_AGENT:
        return Text(PLAIN_MARK + line.text, style="dim italic")
    return Text(PLAIN_MARK + line.text)


class RankLogScreen(ModelScreen):
    """Rank ``rank``'s output, from the agent at ``address``."""

    BINDINGS = [
        BACK,
        Binding("end", "follow", "Follow", tooltip="log: jump to the end and follow new lines"),
    ]

    DEFAULT_CSS = """
    RankLogScreen #log-status { height: auto; padding: 0 1; }
    RankLogScreen #log-lines { height: 1fr; border: round $primary; }
    """

    def __init__(self, control: DashboardControl, address: str, rank: int) -> None:
        super().__init__()
        self.control = control
        self.address = address
        self.rank = rank
        self.last_seq = 0
        """The agent's number of the newest line shown (0: none yet)."""
        self.answer: agent_pb2.GetRankLogResponse | None = None
        self.problem = ""
        """Why the last ask failed (one line), or empty."""
        self.lines_shown = 0
        self._asking = False

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield Static(f"rank {self.rank} on {self.address}: asking its agent ...", id="log-status", markup=False)
        log = RichLog(id="log-lines", max_lines=LINES_KEPT, wrap=False, markup=False, highlight=False)
        log.border_title = f"rank {self.rank}: stdout and stderr (! stderr)"
        log.border_subtitle = "end: follow | esc: back"
        yield log
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(RichLog).focus()
        self._ask_again(first=True)
        self.set_interval(POLL_SECONDS, self._ask_again)

    def show(self, state: ViewState) -> None:
        self.show_header(state)

    def action_follow(self) -> None:
        self.query_one(RichLog).scroll_end(animate=False)

    def _ask_again(self, first: bool = False) -> None:
        # One ask at a time: a slow agent is not asked again on top of itself. Paused (p), the lines stay as they
        # are, as every screen's figures do; a log opened while paused still shows what there is.
        if not self._asking and (first or not getattr(self.app, "paused", False)):
            self._asking = True
            self.run_worker(self._ask(), group="rank-log", exit_on_error=False)

    async def _ask(self) -> None:
        try:
            answer = await self.control.rank_log(self.address, self.rank, LINES_ASKED)
        except grpc.aio.AioRpcError as error:
            self.problem = problem_text(error, self.rank, self.address)
            self._show_status()
            return
        finally:
            self._asking = False
        self.problem = ""
        self.answer = answer
        self._append(answer)
        self._show_status()

    def _append(self, answer: agent_pb2.GetRankLogResponse) -> None:
        log = self.query_one(RichLog)
        newest = answer.lines[-1].seq if answer.lines else 0
        if newest < self.last_seq:
            # The numbers went back: the agent restarted, and its log with it. Start over rather than mix the two.
            log.clear()
            self.last_seq = self.lines_shown = 0
        new = [line for line in answer.lines if line.seq > self.last_seq]
        if not new:
            return
        # Follow the end only while the reader is at it: scrolled up, they keep their place.
        follow = log.scroll_y >= log.max_scroll_y
        missed = new[0].seq - self.last_seq - 1
        if missed > 0 and self.last_seq > 0:
            log.write(Text(f"{PLAIN_MARK}--- {missed} lines not shown: they came faster than this screen asks ---",
                           style="dim italic"), scroll_end=follow)  # fmt: skip
        for line in new:
            log.write(line_text(line), scroll_end=follow)
        self.last_seq = new[-1].seq
        self.lines_shown += len(new)

    def _show_status(self) -> None:
        status = self.query_one("#log-status", Static)
        if self.problem:
            status.update(Text(self.problem, style="bold red"))
            return
        answer = self.answer
        if answer is None:
            return
        log = self.query_one(RichLog)
        parts = [f"rank {self.rank} on {self.address}"]
        if answer.pid:
            parts.append(f"pid {answer.pid}, attempt {answer.restart_count}")
        parts.append(f"{self.lines_shown:,} lines" if self.lines_shown else "no output yet")
        if answer.lines_dropped:
            parts.append(f"{answer.lines_dropped:,} lost")
        at_end = log.scroll_y >= log.max_scroll_y
        parts.append("following" if at_end else "scrolled up (end: follow)")
        status.update(Text(" | ".join(parts)))
