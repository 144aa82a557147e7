"""One rank's steps as bars of phases (data, forward, backward, waiting, optimizer), on one time scale."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from megascope.dashboard.levels import Level
from megascope.dashboard.model.views import PhaseTimes, RankTimeline
from megascope.dashboard.widgets.palette import Palette

# Phases of a step in the timeline: a letter each, so the bars read without colour.
TIMELINE_PHASES: tuple[tuple[str, str, Level | None, str], ...] = (
    ("data", "D", Level.WARN, "data wait"),
    ("forward", "F", Level.OK, "forward"),
    ("backward", "B", Level.OK, "backward compute"),
    ("comm", "W", Level.BAD, "waiting in collectives"),
    ("optimizer", "O", None, "optimizer"),
    ("other", ".", None, "other"),
)


def timeline_legend(palette: Palette) -> Text:
    text = Text(no_wrap=True)
    for i, (_, letter, level, what) in enumerate(TIMELINE_PHASES):
        if i:
            text.append("  ")
        text.append(letter, style=f"reverse {palette.colour(level)}" if level else "reverse")
        text.append(f" {what}")
    return text


def timeline_bars(
    steps: Sequence[int], phases: Sequence[PhaseTimes | None], scale: float, width: int, palette: Palette
) -> Text:
    """One line per step: the step number, a bar of its phases (``scale`` seconds fill ``width`` cells), the total."""
    text = Text(no_wrap=True)
    for i, (step, times) in enumerate(zip(steps, phases, strict=True)):
        if i:
            text.append("\n")
        text.append(f"{step:>7} ", style="dim")
        if times is None:
            text.append("(no report)", style="dim")
            continue
        # Cumulative rounding so the bar's length matches the total even when phases are short.
        drawn, elapsed = 0, 0.0
        for name, letter, level, _ in TIMELINE_PHASES:
            elapsed += getattr(times, name)
            end = round(elapsed / scale * width) if scale > 0 else 0
            if end > drawn:
                style = f"reverse {palette.colour(level)}" if level else "reverse"
                text.append(letter * (end - drawn), style=style)
                drawn = end
        text.append(" " * max(0, width - drawn))
        text.append(f" {times.total * 1000:>7,.0f} ms")
    return text


def timeline_scale(timeline: RankTimeline) -> float:
    """Seconds the full bar width stands for: the longest step on either side."""
    totals = [p.total for p in timeline.rank_phases if p is not None] + [p.total for p in timeline.median_phases]
    return max(totals, default=0.0)
