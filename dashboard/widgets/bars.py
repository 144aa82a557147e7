"""One-line bars over the main screen's tables: the straggler flags standing now, and the job's last fault."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.widgets import Static

from megascope.dashboard import levels
from megascope.dashboard.levels import Level
from megascope.dashboard.model.stragglers import StragglerFlag
from megascope.dashboard.model.views import HeaderView
from megascope.dashboard.widgets.palette import Palette


class StragglerBar(Static):
    """The straggler flags standing now, costliest first, one line each; hidden while there are none."""

    MAX_LINES = 3
    text: Text = Text()
    """What the bar shows now (tests read it)."""

    def show(self, flags: Sequence[StragglerFlag], palette: Palette) -> None:
        self.display = bool(flags)
        text = Text(no_wrap=True, overflow="ellipsis")
        ordered = sorted(flags, key=lambda f: (-f.cost_seconds, f.rank))
        for i, flag in enumerate(ordered[: self.MAX_LINES]):
            if i:
                text.append("\n")
            text.append(f" STRAGGLER{levels.MARKERS[Level.WARN]} ", style=f"bold {palette.warn}")
            text.append(flag.describe())
        if len(ordered) > self.MAX_LINES:
            text.append(f"\n ... and {len(ordered) - self.MAX_LINES} more: h opens the heat map", style="dim")
        if text.plain != self.text.plain:
            self.text = text
            self.update(text)


class FaultBar(Static):
    """The job's faults: the newest crash or hang and what its restart cost, or that the job gave up; hidden
    while there has been none."""

    text: Text = Text()
    """What the bar shows now (tests read it)."""

    def show(self, header: HeaderView, palette: Palette) -> None:
        fault = header.last_fault
        self.display = fault is not None or header.job_failed is not None
        # Wrapped, never cut: the whole line is what to act on (and enter on its event in the log shows it all).
        text = Text()
        if header.job_failed is not None:
            text.append(f" JOB FAILED{levels.MARKERS[Level.BAD]} ", style=f"bold {palette.bad}")
            text.append(header.job_failed)
        elif fault is not None:
            # Red while the job is down, yellow once a restart got it training again.
            level = Level.BAD if fault.restart is None else Level.WARN
            text.append(f" {fault.kind.upper()}{levels.MARKERS[level]} ", style=f"bold {palette.colour(level)}")
            text.append(fault.describe())
            text.append(f"  (job restarts: {header.restarts})", style="dim")
        if text.plain != self.text.plain:
            self.text = text
            self.update(text)
