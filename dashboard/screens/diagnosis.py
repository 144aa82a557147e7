"""The diagnosis screen (``s``): every rank's stacks on demand, grouped, with the job-wide culprit.

The app collects the stacks (``DumpStacks`` on every connected agent at once) and hands them over with
``set_stacks``; the screen never reads the network. The top says who the culprit is and why (the job-wide
diagnosis of :mod:`megascope.dashboard.model.diagnosis`), and the agents' own verdict on the newest ``hang`` event,
which appears here as soon as the event arrives. Below: a table of ranks (the culprit marked), the groups of
identical main-thread stacks (the groups of one marked: the odd ones), and the full stack text of the rank
under the cursor.
"""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Footer, Static

from megascope.dashboard import formatting as fmt
from megascope.dashboard import levels
from megascope.dashboard.levels import Level
from megascope.dashboard.model.diagnosis import JobStacks, StackGroup, StackRow
from megascope.dashboard.model.incidents import FaultView
from megascope.dashboard.model.views import RankRow
from megascope.dashboard.screens.base import BACK, ModelScreen, ViewState
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.palette import Palette, cell, word
from megascope.dashboard.widgets.tables import KeyedTable, rank_status_word

CULPRIT = levels.MARKERS[Level.BAD]
"""What marks the culprit and the odd stacks besides their colour."""


class StackRanksTable(KeyedTable):
    COLUMNS = (
        ("rank", "rank", 6),
        ("node", "node", 10),
        ("state", "state", 15),
        ("step", "last step", 9),
        ("collectives", "collectives", 11),
        ("stacks", "stacks via", 18),
        ("group", "group", 5),
    )


class StackGroupsTable(KeyedTable):
    COLUMNS = (
        ("group", "group", 5),
        ("ranks", "ranks", 20),
        ("signature", "main thread's innermost frames (innermost first)", 60),
    )
    FLEX_COLUMN = "signature"


def stack_rank_cells(row: StackRow, status: RankRow | None, culprit: bool, odd: bool, palette: Palette) -> list[Text]:
    style = f"bold {palette.bad}" if culprit else ""
    state = rank_status_word(status, palette) if status is not None else cell("-", right=False)
    return [
        cell(str(row.rank), Level.BAD, palette) if culprit else cell(str(row.rank)),
        Text(row.node, style=style, no_wrap=True),
        state,
        cell(fmt.number(row.last_step)),
        cell(fmt.number(row.collectives_issued)),
        word(row.method or "-", None if row.answered else Level.WARN, palette),
        cell(row.group, Level.BAD, palette) if odd else cell(row.group),
    ]


def stack_group_cells(group: StackGroup, culprit: int | None, palette: Palette) -> list[Text]:
    marked = group.odd or (culprit is not None and culprit in group.ranks)
    return [
        cell(group.label, Level.BAD, palette) if marked else cell(group.label),
        Text(", ".join(map(str, group.ranks)), style=f"bold {palette.bad}" if marked else "", no_wrap=True),
        Text(group.signature, style=palette.bad if marked else "", no_wrap=True, overflow="ellipsis"),
    ]


class DiagnosisScreen(ModelScreen):
    """Stacks of every rank, grouped, with the job-wide diagnosis; ``s`` collects them anew."""

    BINDINGS = [BACK]

    def __init__(self) -> None:
        super().__init__()
        self.stacks: JobStacks | None = None
        """The last stacks collected; None before the first answer."""
        self.note = ""
        """Why there are no stacks or what is under way ("collecting from 2 agents ...")."""
        self._shown_rank: int | None = None

    def compose(self) -> ComposeResult:
        yield HeaderBar(id="header")
        yield Static(id="diagnosis-summary")
        ranks = StackRanksTable(id="stack-ranks")
        ranks.border_title = f"Ranks ({CULPRIT}: the culprit; the cursor's rank's stacks are shown below)"
        yield ranks
        groups = StackGroupsTable(id="stack-groups")
        groups.border_title = f"Ranks with identical stacks ({CULPRIT}: a stack no other rank shares; enter: its rank)"
        yield groups
        with VerticalScroll(id="stack-scroll") as scroll:
            scroll.border_title = "Stacks"
            yield Static(id="stack-text")
        yield Footer()

    # -- what the app hands over ---------------------------------------------------------------------------

    def set_collecting(self, what: str) -> None:
        self.note = what
        self._redraw()

    def set_stacks(self, stacks: JobStacks) -> None:
        self.stacks = stacks
        self.note = ""
        self._shown_rank = None  # show the new culprit's stacks (or the first rank's)
        self._redraw()

    def _redraw(self) -> None:
        if self.is_mounted:
            self.request_redraw()

    # -- drawing -------------------------------------------------------------------------------------------

    def show(self, state: ViewState) -> None:
        self.show_header(state)
        self._draw(state)

    def show_paused(self, state: ViewState) -> None:
        # Stacks are a snapshot the user asked for, not live figures: they are drawn even while paused.
        super().show_paused(state)
        self._draw(state)

    def _draw(self, state: ViewState) -> None:
        palette, stacks = state.palette, self.stacks
        hang = next((f for f in reversed(state.model.faults()) if f.kind == "hang"), None)
        self.query_one("#diagnosis-summary", Static).update(self._summary(stacks, hang, palette))
        self._draw_groups(stacks, palette)
        statuses = {row.rank: row for row in state.model.rank_rows()}
        culprit = stacks.culprit if stacks is not None else None
        odd = {rank for group in stacks.groups if group.odd for rank in group.ranks} if stacks is not None else set()
        rows = stacks.rows if stacks is not None else ()
        table = self.query_one(StackRanksTable)
        table.set_rows(
            [
                (str(r.rank), stack_rank_cells(r, statuses.get(r.rank), r.rank == culprit, r.rank in odd, palette))
                for r in rows
            ]
        )
        if self._shown_rank is None and rows:
            first = culprit if culprit is not None else rows[0].rank
            table.move_cursor(row=next(i for i, r in enumerate(rows) if r.rank == first), animate=False)
            self._show_rank(first)

    def _summary(self, stacks: JobStacks | None, hang: FaultView | None, palette: Palette) -> Text:
        text = Text(overflow="ellipsis")
        if stacks is not None:
            text.append("Diagnosis: ", style="bold")
            text.append(stacks.summary(), style=f"bold {palette.bad}" if stacks.culprit is not None else "")
            answered = sum(1 for r in stacks.rows if r.answered)
            text.append(
                f"\n  stacks asked for at {fmt.clock(stacks.wall_time)}: {answered} of {len(stacks.rows)} ranks "
                f"answered, from {stacks.agents_asked - len(stacks.errors)} of {stacks.agents_asked} agents",
                style="dim",
            )
            for address, error in stacks.errors:
                text.append(f"\n  {address}: no stacks: {error}", style=palette.warn)
        if self.note:
            text.append(("\n" if text.plain else "") + self.note, style="italic")
        if stacks is None and not self.note:
            text.append("no stacks yet: s collects them")
        if hang is not None:
            # The agents' own verdict, from the newest hang event: it shows here the moment the event arrives.
            text.append(("\n" if text.plain else "") + f"Agent's diagnosis at {fmt.clock(hang.wall_time)}: ")
            text.append(hang.describe(), style=palette.bad if hang.restart is None else "")
        return text

    def _draw_groups(self, stacks: JobStacks | None, palette: Palette) -> None:
        groups = stacks.groups if stacks is not None else ()
        culprit = stacks.culprit if stacks is not None else None
        self.query_one(StackGroupsTable).set_rows([(g.label, stack_group_cells(g, culprit, palette)) for g in groups])

    def _show_rank(self, rank: int) -> None:
        row = self.stacks.row(rank) if self.stacks is not None else None
        self._shown_rank = rank
        panel = self.query_one("#stack-scroll", VerticalScroll)
        if row is None:
            panel.border_title = "Stacks"
            self.query_one("#stack-text", Static).update("")
            return
        panel.border_title = f"Stacks of rank {row.rank} on {row.node} (pid {row.pid}, {row.method or 'no answer'})"
        body = row.text if row.answered else f"rank {row.rank} gave no stacks: {row.method or 'no answer'}"
        self.query_one("#stack-text", Static).update(Text(body, no_wrap=True))
        panel.scroll_home(animate=False)

    # -- moving around -------------------------------------------------------------------------------------

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if event.data_table.id == "stack-ranks" and key is not None and int(key) != self._shown_rank:
            self._show_rank(int(key))

    def on_data_table_row_selected(self, event: DataTable.RowSelected) -> None:
        """``enter`` on a group: the cursor goes to its first rank, whose stacks show below."""
        if event.data_table.id != "stack-groups" or self.stacks is None:
            return
        group = next((g for g in self.stacks.groups if g.label == event.row_key.value), None)
        table = self.query_one(StackRanksTable)
        if group is not None and str(group.ranks[0]) in table.rows:
            table.move_cursor(row=table.get_row_index(str(group.ranks[0])), animate=False)
            table.focus()
