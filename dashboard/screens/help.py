"""Help (``?`` or F1): every key, what the colours mean, and the straggler rules.

The key table is made from the bindings themselves (``key_rows``): the app hands the screen its own bindings
and those of its screens and widgets, and each binding's ``tooltip`` is its line here (and its tooltip in the
footer), so a key cannot be added without showing up in help, or described twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from rich.console import Group
from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from megascope.dashboard import levels
from megascope.dashboard.connection import STALE_AFTER
from megascope.dashboard.levels import Level
from megascope.dashboard.model.stragglers import DEFAULT_CONFIG, StragglerConfig
from megascope.dashboard.widgets.palette import Palette

_KEY_NAMES = {
    "question_mark": "?",
    "escape": "esc",
    "f1": "F1",
    "pageup": "PgUp",
    "pagedown": "PgDn",
    "home": "Home",
    "end": "End",
    "ctrl+home": "ctrl+Home",
    "ctrl+end": "ctrl+End",
}


@dataclass(frozen=True)
class KeyRow:
    """One line of the help's key table: every key bound to one action, and what it does."""

    keys: str
    """As a person types them: ``? / F1``, ``down / j``."""
    what: str


def key_rows(bindings: Iterable[BindingType]) -> list[KeyRow]:
    """One row per action, in the order the actions first appear; what it does is the first tooltip among its
    bindings (the long text), else the first description (the footer's word). Actions that read the same (up and
    down: "move in a table") share a row."""
    keys: dict[str, list[str]] = {}
    tooltips: dict[str, str] = {}
    descriptions: dict[str, str] = {}
    for binding in Binding.make_bindings(bindings):
        names = keys.setdefault(binding.action, [])
        name = binding.key_display or _KEY_NAMES.get(binding.key, binding.key)
        if name not in names:
            names.append(name)
        if binding.tooltip:
            tooltips.setdefault(binding.action, binding.tooltip)
        descriptions.setdefault(binding.action, binding.description)
    rows: dict[str, list[str]] = {}
    for action, names in keys.items():
        rows.setdefault(tooltips.get(action) or descriptions[action], []).extend(names)
    return [KeyRow(" / ".join(names), what) for what, names in rows.items()]


def help_renderable(palette: Palette, keys: Sequence[KeyRow], rules: StragglerConfig = DEFAULT_CONFIG) -> Group:
    table = Table(title="Keys", title_justify="left", show_header=False, box=None, padding=(0, 2))
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    for row in keys:
        table.add_row(row.keys, row.what)

    colours = Table(title="Colours", title_justify="left", show_header=False, box=None, padding=(0, 2))
    colours.add_column(style="bold", no_wrap=True)
    colours.add_column()
    meaning = {Level.OK: "fine", Level.WARN: "look at it", Level.BAD: "act on it"}
    for level in Level:
        marker = levels.MARKERS[level]
        line = f"{meaning[level]}; " + (f"numbers end in {marker}" if marker else "numbers carry no marker")
        colours.add_row(Text(levels.COLOUR_NAMES[level], style=f"bold {palette.colour(level)}"), line)
    colours.add_row("", "Status words say what their colour says, so nothing is told by colour alone.")
    for threshold in levels.THRESHOLDS:
        colours.add_row(threshold.name, threshold.describe())

    def by_level(mapping: dict[str, Level | None]) -> Text:
        text = Text()
        for level in (Level.OK, Level.WARN, Level.BAD):
            names = [n for n, lv in mapping.items() if lv is level]
            if names:
                text.append(f"{levels.COLOUR_NAMES[level]}: {', '.join(names)}", style=palette.colour(level))
                text.append("   ")
        plain = [n for n, lv in mapping.items() if lv is None]
        if plain:
            text.append(f"plain: {', '.join(plain)}")
        return text

    colours.add_row("rank status", by_level(dict(levels.STATUS_LEVELS)))
    colours.add_row("connection", by_level(dict(levels.CONNECTION_LEVELS)))
    colours.add_row(
        "", f"LOST: the agent vanished (its stream broke, or sent nothing for {STALE_AFTER:g}s); DISCONNECTED: never "
        "reached, or it stopped"
    )  # fmt: skip
    colours.add_row("event severity", by_level(levels.SEVERITY_LEVELS))

    stragglers = Table(
        title="Straggler rules (dashboard/model/stragglers.py)", title_justify="left", show_header=False, box=None,
        padding=(0, 2),
    )  # fmt: skip
    stragglers.add_column(style="bold", no_wrap=True)
    stragglers.add_column()
    for name, meaning in rules.describe():
        stragglers.add_row(name, meaning)
    stragglers.add_row("", "A flag names the rank and node, its cost to the job per step, since when, and the likely "
                       "cause: compute, data, GC, host or link. It clears when the slowdown ends.")  # fmt: skip
    return Group(table, Text(""), colours, Text(""), stragglers)


class HelpScreen(ModalScreen[None]):
    """Every key (``keys``: the app's bindings, see ``key_rows``), and what green, yellow and red mean."""

    BINDINGS = [
        Binding("escape", "dismiss", "Back"),
        Binding("question_mark", "dismiss", "Close", key_display="?"),
        Binding("f1", "dismiss", "Close", show=False),
        # A modal keeps the app's keys away; pausing is still wanted here: the screen behind keeps updating.
        Binding("p", "app.toggle_pause", "Pause"),
    ]

    def __init__(self, palette: Palette, keys: Sequence[KeyRow], rules: StragglerConfig = DEFAULT_CONFIG) -> None:
        super().__init__()
        self.palette = palette
        self.keys = list(keys)
        self.rules = rules

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            with VerticalScroll():
                yield Static(help_renderable(self.palette, self.keys, self.rules), id="help-text")
            yield Static("esc, ? or F1 closes this help; arrows, PgUp/PgDn and the wheel scroll it", id="help-hint")

    def on_mount(self) -> None:
        # Focused, so the keys scroll it at once: on a short terminal most of it is below the fold.
        self.query_one(VerticalScroll).focus()
