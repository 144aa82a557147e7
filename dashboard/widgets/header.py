"""The header bar: one line of job-level figures, with a PAUSED badge while the view is frozen."""

from __future__ import annotations

from rich.text import Text
from textual.widgets import Static

from megascope.dashboard import formatting as fmt
from megascope.dashboard import levels
from megascope.dashboard.levels import Level
from megascope.dashboard.model.views import HeaderView
from megascope.dashboard.widgets.palette import Palette


class HeaderBar(Static):
    """One line of job-level figures, with a PAUSED badge while the view is frozen."""

    _last: tuple[HeaderView, str] | None = None
    text: Text = Text()
    """What the bar shows now (tests read it)."""

    def set_paused(self, paused: bool, palette: Palette) -> None:
        """Redraw the last figures with or without the badge."""
        if self._last is not None:
            self.show(self._last[0], paused, palette, self._last[1])

    def show(self, header: HeaderView, paused: bool, palette: Palette, title: str = "megascope") -> None:
        self._last = (header, title)
        text = Text(no_wrap=True, overflow="ellipsis")
        text.append(f" {title} ", style="bold")
        if paused:
            text.append(" PAUSED ", style=f"bold reverse {palette.warn}")
            text.append(" ")
        step = fmt.number(header.step)
        if header.total_steps:
            step += f"/{header.total_steps:,}"
        connected_level = (
            Level.OK if header.connected_agents == header.total_agents and header.total_agents else Level.BAD
        )
        if header.connected_agents and header.connected_agents < header.total_agents:
            connected_level = Level.WARN
        fields: list[tuple[str, str, Level | None]] = [
            ("step", step, None),
            ("tok/s", fmt.number(header.tokens_per_second), None),
            ("MFU", fmt.percent(None if header.mfu is None else 100 * header.mfu, 1), None),
            ("loss", fmt.loss(header.loss), None),
            ("step time", "-" if header.step_seconds is None else f"{1000 * header.step_seconds:,.0f} ms", None),
            ("ETA", fmt.duration(header.eta_seconds), None),
            ("up", fmt.duration(header.uptime_seconds), None),
            ("agents", f"{header.connected_agents}/{header.total_agents}", connected_level),
        ]
        ranks = f"{header.known_ranks}"
        if header.world_size:
            ranks += f"/{header.world_size}"
        fields.append(("ranks", ranks, None))
        fields.append(("stragglers", str(header.stragglers), Level.WARN if header.stragglers else None))
        if header.checkpoint is not None:
            fields.append(("ckpt", header.checkpoint, None))
        if header.restarts:
            fields.append(("restarts", str(header.restarts), Level.WARN))
        for i, (label, value, level) in enumerate(fields):
            if i:
                text.append(" | ", style="dim")
            text.append(f"{label} ", style="dim")
            text.append(value + levels.MARKERS[level] if level is not None else value, style=palette.colour(level))
        self.text = text
        self.update(text)
