"""The replay's "go to" question: a time, an offset from the start, or a step (``t`` on a replay)."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from megascope.dashboard.replay import HINT, SeekTarget, parse_target


class SeekScreen(ModalScreen[SeekTarget | None]):
    """Asks where to go; dismissed with the target, or None (esc)."""

    BINDINGS = [Binding("escape", "cancel", "Cancel", show=False)]

    def __init__(self, start: float) -> None:
        super().__init__()
        self.start = start

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm-box"):
            yield Static(Text("Go to", style="bold"), id="confirm-question")
            yield Input(placeholder="12:34:56, +90, +5:00 or step 400", id="seek-input")
            yield Static(HINT, id="confirm-hint")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        target = parse_target(event.value, self.start)
        if isinstance(target, str):
            self.query_one("#confirm-hint", Static).update(Text(target))
            return
        self.dismiss(target)

    def action_cancel(self) -> None:
        self.dismiss(None)
