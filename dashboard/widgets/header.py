"""The header bar: the job's figures on one line, or two on a narrow terminal, with a PAUSED badge while the view
is frozen.

Each figure is drawn whole or not at all: when they do not fit in ``MAX_LINES`` lines the least important go
first (uptime, ETA, step time, checkpoint, ...), never the step, the fault count, the restarts or the marker of
what stops the job (failed, crash, hang, stalled, finished), so no "| restarts" is ever left without its value.
Once the job has had a fault, the run's ETTR (effective training time ratio) follows the restart count: what the
faults have cost so far.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.widgets import Static

from megascope.dashboard import formatting as fmt
from megascope.dashboard import levels
from megascope.dashboard.levels import Level
from megascope.dashboard.model.views import HeaderView
from megascope.dashboard.widgets.palette import Palette

KEEP = 100
"""The priority of a figure that is never left out."""
SEPARATOR = " | "


@dataclass(frozen=True)
class Field:
    label: str
    value: str
    level: Level | None
    priority: int
    """Higher stays longer; ``KEEP`` always stays."""

    def width(self) -> int:
        marker = levels.MARKERS[self.level] if self.level is not None else ""
        return len(self.label) + (1 if self.label else 0) + len(self.value) + len(marker)


def header_fields(header: HeaderView, faults: int | None = None) -> list[Field]:
    """The header's figures, in reading order, each with how long it stays on a narrow terminal."""
    step = fmt.number(header.step)
    if header.total_steps:
        step += f"/{header.total_steps:,}"
    connected_level = Level.OK if header.connected_agents == header.total_agents and header.total_agents else Level.BAD
    if header.connected_agents and header.connected_agents < header.total_agents:
        connected_level = Level.WARN
    fields: list[Field] = []
    marker = _down_marker(header)
    if marker is not None:
        fields.append(Field("", marker[0], marker[1], KEEP))
    fields += [
        Field("step", step, None, KEEP),
        # A finished job moves no tokens: its last rate would read as a live one.
        Field("tok/s", fmt.number(None if header.finished is not None else header.tokens_per_second), None, 50),
        Field("MFU", fmt.percent(None if header.mfu is None else 100 * header.mfu, 1), None, 30),
        Field("loss", fmt.loss(header.loss), None, 60),
        Field("step time", "-" if header.step_seconds is None else f"{1000 * header.step_seconds:,.0f} ms", None, 20),
        Field("ETA", fmt.duration(header.eta_seconds), None, 15),
        Field("up", fmt.duration(header.uptime_seconds), None, 10),
        Field("agents", f"{header.connected_agents}/{header.total_agents}", connected_level, 80),
    ]
    ranks = f"{header.known_ranks}"
    if header.world_size:
        ranks += f"/{header.world_size}"
    fields.append(Field("ranks", ranks, None, 40))
    fields.append(Field("stragglers", str(header.stragglers), Level.WARN if header.stragglers else None, 70))
    if header.checkpoint is not None:
        fields.append(Field("ckpt", header.checkpoint, None, 25))
    if faults is not None and faults:
        fields.append(Field("faults", str(faults), Level.BAD if marker is not None else Level.WARN, KEEP))
    if header.restarts or faults:
        fields.append(Field("restarts", str(header.restarts), Level.WARN if header.restarts else None, KEEP))
        if header.ettr is not None:
            fields.append(Field("ETTR", fmt.percent(100 * header.ettr, 1), None, 75))
    return fields


def _down_marker(header: HeaderView) -> tuple[str, Level] | None:
    """What stops the job, if anything: ``JOB FAILED``; ``CRASH`` / ``HANG`` while the newest fault has no restart
    yet; ``STALLED 12s`` when no rank has stepped for a few median steps; ``FINISHED``. None while training."""
    if header.job_failed is not None:
        return "JOB FAILED", Level.BAD
    fault = header.last_fault
    if fault is not None and fault.restart is None:
        return fault.kind.upper(), Level.BAD
    if header.stalled:
        return f"STALLED: last step {fmt.duration(header.last_step_age)} ago", Level.WARN
    if header.finished is not None:
        return "FINISHED", Level.OK
    return None


def fit(fields: list[Field], first_line_used: int, width: int, max_lines: int) -> list[list[Field]]:
    """The fields on at most ``max_lines`` lines of ``width``, leaving out the lowest priorities first; the fields
    that must stay stay, on more lines if they need them."""
    kept = list(fields)
    while True:
        lines = _pack(kept, first_line_used, width)
        droppable = [f for f in kept if f.priority < KEEP]
        if len(lines) <= max_lines or not droppable:
            return lines
        kept.remove(min(droppable, key=lambda f: f.priority))


def _pack(fields: list[Field], used: int, width: int) -> list[list[Field]]:
    lines: list[list[Field]] = [[]]
    for field in fields:
        need = field.width() + (len(SEPARATOR) if lines[-1] else 0)
        if lines[-1] and used + need > width:
            lines.append([])
            used, need = 1, field.width()  # a continuation line starts one column in
        lines[-1].append(field)
        used += need
    return lines


class HeaderBar(Static):
    """The job's figures on one or two lines, with a PAUSED badge while the view is frozen."""

    MAX_LINES = 2
    _last: tuple[HeaderView, str, int | None] | None = None
    _palette: Palette | None = None
    _paused = False
    text: Text = Text()
    """What the bar shows now (tests read it)."""

    def set_paused(self, paused: bool, palette: Palette) -> None:
        """Redraw the last figures with or without the badge."""
        if self._last is not None:
            self.show(self._last[0], paused, palette, self._last[1], self._last[2])

    def on_resize(self) -> None:
        if self._last is not None and self._palette is not None:
            self.show(self._last[0], self._paused, self._palette, self._last[1], self._last[2])

    def show(
        self, header: HeaderView, paused: bool, palette: Palette, title: str = "megascope", faults: int | None = None
    ) -> None:
        self._last, self._palette, self._paused = (header, title, faults), palette, paused
        width = self.size.width or self.app.size.width
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {title} ", style="bold")
        if paused:
            text.append(" PAUSED ", style=f"bold reverse {palette.warn}")
            text.append(" ")
        lines = fit(header_fields(header, faults), len(text.plain), width, self.MAX_LINES)
        for n, line in enumerate(lines):
            if n:
                text.append("\n ")
            for i, field in enumerate(line):
                if i:
                    text.append(SEPARATOR, style="dim")
                if field.label:
                    text.append(f"{field.label} ", style="dim")
                value = field.value + (levels.MARKERS[field.level] if field.level is not None else "")
                style = palette.colour(field.level)
                text.append(value, style=f"bold reverse {style}" if not field.label and style else style)
        self.text = text
        self.update(text)
