"""Colours and cells: the theme's three levels, and how a value is drawn in one (always with a text marker
or a word as well, so nothing is told by colour alone).

Colours come from the active theme's ``text-success`` / ``text-warning`` / ``text-error`` so light and dark
themes both read well.
"""

from __future__ import annotations

from dataclasses import dataclass

from rich.text import Text
from textual.app import App

from megascope.dashboard import levels
from megascope.dashboard.levels import Level


@dataclass(frozen=True)
class Palette:
    """Theme colours for the three levels, read from the app's CSS variables."""

    ok: str
    warn: str
    bad: str

    @classmethod
    def from_app(cls, app: App[object]) -> Palette:
        variables = app.get_css_variables()
        return cls(ok=variables["text-success"], warn=variables["text-warning"], bad=variables["text-error"])

    def colour(self, level: Level | None) -> str:
        if level is None:
            return ""
        return {Level.OK: self.ok, Level.WARN: self.warn, Level.BAD: self.bad}[level]


def cell(text: str, level: Level | None = None, palette: Palette | None = None, *, right: bool = True) -> Text:
    """A table cell: ``text`` in the level's colour, followed by its marker padded to two columns.

    The padding keeps right-aligned numbers lined up whether or not they carry a marker.
    """
    marker = levels.MARKERS[level] if level is not None else ""
    style = palette.colour(level) if palette is not None else ""
    if right:
        return Text(f"{text}{marker:<2}", style=style, justify="right", no_wrap=True)
    return Text(text, style=style, no_wrap=True)


def word(text: str, level: Level | None, palette: Palette) -> Text:
    """A status word in its level's colour (the word itself says what the colour says)."""
    style = palette.colour(level)
    return Text(text, style=f"bold {style}" if level is Level.BAD else style, no_wrap=True)
