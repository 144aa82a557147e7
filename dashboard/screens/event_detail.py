"""One event, whole (``enter`` on an event): its full text and every attribute of its typed detail.

The event log's text column is cut to the terminal's width; this is where an event is read in full. A recovery in
place (``recovered``) also shows its breakdown in words (detection, re-form, state transfer, replacement ready,
total, steps redone, who was replaced and who gave the state) before its raw attributes.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Static

from megascope.dashboard import formatting as fmt
from megascope.dashboard.model.views import EventRow


def event_detail_lines(event: EventRow) -> list[tuple[str, str]]:
    """(name, value) of everything the event says, in the order a reader wants it."""
    lines = [
        ("time", f"{fmt.clock(event.wall_time)} ({event.wall_time:.3f})"),
        ("node", event.node),
        ("severity", event.severity),
        ("kind", event.kind),
    ]
    if event.rank is not None:
        lines.append(("rank", str(event.rank)))
    if event.step is not None:
        lines.append(("step", fmt.number(event.step)))
    lines.append(("text", event.text))
    if event.recovery is not None:
        lines += event.recovery.breakdown()
    lines += _flatten(event.detail)
    return lines


def _flatten(detail: dict[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for name, value in detail.items():
        if isinstance(value, dict):
            out += _flatten(value, f"{prefix}{name}.")
        elif isinstance(value, list):
            if value and all(isinstance(v, dict) for v in value):
                for i, item in enumerate(value):
                    out += _flatten(item, f"{prefix}{name}[{i}].")
            else:
                out.append((f"{prefix}{name}", ", ".join(str(v) for v in value)))
        else:
            out.append((f"{prefix}{name}", str(value)))
    return out


class EventDetailScreen(ModalScreen[None]):
    """One event over the dimmed screen: every field, wrapped, scrollable; ``esc`` closes it."""

    BINDINGS = [
        Binding("escape", "dismiss", "Back"),
        Binding("enter", "dismiss", "Close", show=False),
        Binding("q", "dismiss", "Close", show=False),
    ]

    def __init__(self, event: EventRow) -> None:
        super().__init__()
        self.event = event

    def compose(self) -> ComposeResult:
        with Vertical(id="event-box") as box:
            box.border_title = f"{self.event.severity} {self.event.kind}"
            with VerticalScroll(id="event-scroll"):
                table = Table.grid(padding=(0, 2))
                table.add_column(style="bold", no_wrap=True)
                table.add_column(overflow="fold")
                for name, value in event_detail_lines(self.event):
                    table.add_row(name, Text(value))
                yield Static(table, id="event-text")
            yield Static("esc closes this event", id="event-hint")
