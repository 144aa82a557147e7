"""The straggler heat map: ranks (grouped by node) x recent steps, each cell a rank's compute time over the
median rank's."""

from __future__ import annotations

import math

from rich.segment import Segment
from rich.style import Style
from textual import events
from textual.binding import Binding
from textual.geometry import Region, Size
from textual.message import Message
from textual.scroll_view import ScrollView
from textual.strip import Strip

from megascope.dashboard import levels
from megascope.dashboard.levels import Level
from megascope.dashboard.model.stragglers import HeatMap, StragglerFlag
from megascope.dashboard.widgets.palette import Palette

# Heat map cells: a glyph per level, so the map reads without colour too.
HEAT_MISSING = " "
HEAT_FASTER = "-"
"""Compute time below 1 / COMPUTE_RATIO.warn of the median rank's."""
HEAT_GLYPHS: dict[Level, str] = {Level.OK: "·", Level.WARN: "+", Level.BAD: "#"}


def heat_glyph(ratio: float) -> tuple[str, Level | None]:
    """The cell of one compute-time ratio: its glyph and its level (None: no colour)."""
    if math.isnan(ratio):
        return HEAT_MISSING, None
    if ratio * levels.COMPUTE_RATIO.warn < 1.0:
        return HEAT_FASTER, None
    level = levels.COMPUTE_RATIO.level(ratio)
    assert level is not None
    return HEAT_GLYPHS[level], level


class HeatMapView(ScrollView, can_focus=True):
    """Ranks (lines, grouped under a line per node) x recent steps (columns, newest at the right).

    Draws only the lines on screen (``render_line``), so thousands of ranks cost what a screenful does. The
    cursor is on a rank line; ``enter`` posts :class:`RankSelected`.
    """

    LABEL_WIDTH = 21
    """``  1234 SLOW compute! `` before the cells."""

    BINDINGS = [
        Binding("up,k", "move(-1)", "Up", show=False),
        Binding("down,j", "move(1)", "Down", show=False),
        Binding("pageup", "move(-20)", "Page up", show=False),
        Binding("pagedown", "move(20)", "Page down", show=False),
        Binding("home", "move(-1000000)", "First", show=False),
        Binding("end", "move(1000000)", "Last", show=False),
        Binding(
            "enter", "select", "Timeline", tooltip="on a rank in the heat map: its timeline beside the median rank's"
        ),
    ]

    class RankSelected(Message):
        def __init__(self, rank: int) -> None:
            super().__init__()
            self.rank = rank

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._heat: HeatMap | None = None
        self._flags: dict[int, StragglerFlag] = {}
        self._palette: Palette | None = None
        self._lines: list[tuple[str, int]] = []
        """("node", index of its first rank in the heat map) or ("rank", index of the rank in the heat map)."""
        self._rank_lines: list[int] = []
        """Line numbers of the rank lines, in order."""
        self._order_key: tuple[list[int], list[str]] | None = None
        self._node_sizes: dict[str, int] = {}
        self._node_flags: dict[str, int] = {}
        self.cursor = 0
        """Index into the rank lines."""

    def step_columns(self) -> int:
        """How many steps fit beside the labels."""
        return max(1, self.scrollable_content_region.width - self.LABEL_WIDTH)

    def set_data(self, heat: HeatMap, flags: dict[int, StragglerFlag], palette: Palette) -> None:
        if self._order_key != (heat.ranks, heat.nodes):
            selected = self.selected_rank()  # before the lines change under the cursor
            self._order_key = (list(heat.ranks), list(heat.nodes))
            self._layout(heat, selected)
        self._heat, self._flags, self._palette = heat, flags, palette
        self._node_flags = {}
        for flag in flags.values():
            self._node_flags[flag.node] = self._node_flags.get(flag.node, 0) + 1
        self.refresh()

    def _layout(self, heat: HeatMap, selected: int | None) -> None:
        first_rank: dict[str, int] = {}
        self._node_sizes = {}
        for rank, name in zip(heat.ranks, heat.nodes, strict=True):
            first_rank[name] = min(rank, first_rank.get(name, rank))
            self._node_sizes[name] = self._node_sizes.get(name, 0) + 1
        order = sorted(range(len(heat.ranks)), key=lambda i: (first_rank[heat.nodes[i]], heat.nodes[i], heat.ranks[i]))
        lines: list[tuple[str, int]] = []
        node: str | None = None
        for i in order:
            if heat.nodes[i] != node:
                node = heat.nodes[i]
                lines.append(("node", i))
            lines.append(("rank", i))
        self._lines = lines
        self._rank_lines = [n for n, (kind, _) in enumerate(lines) if kind == "rank"]
        self.virtual_size = Size(1, len(lines))  # lines never scroll sideways: the newest steps are kept
        if selected is not None and selected in heat.ranks:
            index = heat.ranks.index(selected)
            self.cursor = next(k for k, n in enumerate(self._rank_lines) if lines[n][1] == index)
        self.cursor = max(0, min(self.cursor, len(self._rank_lines) - 1))

    def selected_rank(self) -> int | None:
        if self._heat is None or not self._rank_lines or self._order_key is None:
            return None
        _, index = self._lines[self._rank_lines[self.cursor]]
        return self._order_key[0][index]

    def action_move(self, delta: int) -> None:
        if not self._rank_lines:
            return
        self.cursor = max(0, min(len(self._rank_lines) - 1, self.cursor + delta))
        line = self._rank_lines[self.cursor]
        # Keep the node line above the first rank in view too.
        self.scroll_to_region(Region(0, max(0, line - 1), 1, 2), animate=False, immediate=True)
        self.refresh()

    def action_select(self) -> None:
        rank = self.selected_rank()
        if rank is not None:
            self.post_message(self.RankSelected(rank))

    def on_click(self, event: events.Click) -> None:
        line = event.y + int(self.scroll_offset.y)
        if line in self._rank_lines:
            self.cursor = self._rank_lines.index(line)
            self.refresh()

    def render_line(self, y: int) -> Strip:
        width = self.scrollable_content_region.width
        line = y + int(self.scroll_offset.y)
        heat, palette = self._heat, self._palette
        if heat is None or palette is None or line >= len(self._lines):
            return Strip.blank(width)
        kind, index = self._lines[line]
        if kind == "node":
            node = heat.nodes[index]
            count = self._node_sizes.get(node, 0)
            flagged = self._node_flags.get(node, 0)
            title = f"── {node}: {count} rank{'s' if count != 1 else ''}"
            if flagged:
                title += f", {flagged} flagged{levels.MARKERS[Level.WARN]}"
            title += " "
            return Strip([Segment(title.ljust(width, "─")[:width], Style(bold=True))])
        rank = heat.ranks[index]
        flag = self._flags.get(rank)
        selected = self._rank_lines[self.cursor] == line if self._rank_lines else False
        label_style = Style(reverse=True) if selected else Style()
        segments = [Segment(f"{rank:>6} ", label_style)]
        if flag is not None:
            tag = f"SLOW {flag.cause.value}{levels.MARKERS[Level.WARN]}"
            segments.append(Segment(f"{tag:<14}", label_style + Style.parse(f"bold {palette.warn}")))
        else:
            segments.append(Segment(" " * 14, label_style))
        columns = max(0, width - self.LABEL_WIDTH)
        ratios = heat.ratios[index][-columns:] if columns else heat.ratios[index][:0]
        # Right-align: the newest step is always in the last column.
        cells = [Segment(" " * (columns - len(ratios)))]
        run_glyph, run_level, run_length = "", None, 0
        for ratio in ratios.tolist():
            glyph, level = heat_glyph(ratio)
            if glyph == run_glyph and level == run_level:
                run_length += 1
                continue
            if run_length:
                cells.append(Segment(run_glyph * run_length, Style.parse(palette.colour(run_level) or "none")))
            run_glyph, run_level, run_length = glyph, level, 1
        if run_length:
            cells.append(Segment(run_glyph * run_length, Style.parse(palette.colour(run_level) or "none")))
        return Strip(segments + cells).crop(0, width)
