"""The checkpoints screen's logic, without Textual: which checkpoints a merge takes, and its result drawn.

The user names a merge's inputs in one line:

    last 4             the newest 4 committed checkpoints
    last 4 every 20    4 steps 20 apart, counted back from the newest (S, S-20, S-40, S-60)
    100-200            every committed checkpoint from step 100 to step 200
    100, 150, 200      these steps

``last``/``every`` go to the agent as they are (the agent, with the engine's rules, picks the steps); a range
becomes the committed steps in it. The preview here shows what the line picks, so a mistake shows before
anything is sent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rich.text import Text

from megascope.protos.megascope.v1 import agent_pb2

METHODS = ("sma", "wma", "ema")
DEFAULT_INPUTS = "last 4"
DEFAULT_ALPHA = 0.2
_LAST = re.compile(r"^last\s+(\d+)(?:\s+every\s+(\d+))?$")
_RANGE = re.compile(r"^(\d+)\s*(?:-|\.\.)\s*(\d+)$")
_STEPS = re.compile(r"^\d+(?:[\s,]+\d+)*$")


class InputsError(ValueError):
    """A merge the form cannot ask for; the text says what to change."""


@dataclass(frozen=True)
class Inputs:
    """A merge's inputs: explicit ``steps``, or the newest ``last`` checkpoints (``every`` steps apart)."""

    steps: tuple[int, ...] = ()
    last: int = 0
    every: int = 0

    def picks(self, committed: Sequence[int]) -> list[int]:
        """The steps this takes from ``committed`` (the agent's answer is the authority; this is the preview)."""
        if self.steps:
            return sorted(self.steps)
        if not committed:
            return []
        if self.every:
            return [committed[-1] - k * self.every for k in reversed(range(self.last))]
        return list(committed[-self.last :])


def parse_inputs(text: str, committed: Sequence[int]) -> Inputs:
    """The inputs a line of the form names (see the module docstring); raises :class:`InputsError`."""
    line = " ".join(text.lower().split())
    if match := _LAST.match(line):
        inputs = Inputs(last=int(match.group(1)), every=int(match.group(2) or 0))
    elif match := _RANGE.match(line):
        first, final = sorted((int(match.group(1)), int(match.group(2))))
        inputs = Inputs(steps=tuple(s for s in committed if first <= s <= final))
        if len(inputs.steps) < 2:
            raise InputsError(f"{first}-{final} holds {len(inputs.steps)} committed checkpoint(s); a merge needs 2")
    elif _STEPS.match(line):
        steps = [int(s) for s in re.split(r"[\s,]+", line)]
        if len(set(steps)) != len(steps):
            raise InputsError(f"a step is listed twice: {', '.join(map(str, steps))}")
        inputs = Inputs(steps=tuple(steps))
    else:
        raise InputsError(f"inputs: {text.strip()!r} is not 'last N', 'last N every V', 'A-B' or 'A, B, C'")
    if inputs.last == 1 or len(inputs.steps) == 1:
        raise InputsError("a merge needs at least 2 checkpoints")
    if inputs.last and inputs.every == 0 and len(committed) < inputs.last:
        raise InputsError(f"last {inputs.last}: only {len(committed)} committed checkpoint(s)")
    missing = [s for s in inputs.picks(committed) if s not in committed]
    if missing:
        raise InputsError(f"no committed checkpoint at step {', '.join(map(str, missing))}")
    return inputs


def toggle_step(text: str, step: int, committed: Sequence[int]) -> str:
    """The inputs line with ``step`` added or, if there, removed (space on a table row); explicit steps."""
    try:
        current = parse_inputs(text, committed).picks(committed)
    except InputsError:
        current = [int(s) for s in re.findall(r"\d+", text)] if _STEPS.match(text.strip()) else []
    chosen = sorted(set(current) ^ {step})
    return ", ".join(map(str, chosen))


def merge_request(inputs: Inputs, method: str, alpha_text: str, evaluate: bool) -> agent_pb2.StartMergeRequest:
    """The StartMerge request for the form's values; raises :class:`InputsError` for a bad alpha."""
    if method not in METHODS:
        raise InputsError(f"method: one of {', '.join(METHODS)}, not {method!r}")
    alpha = 0.0
    if method == "ema":
        try:
            alpha = float(alpha_text) if alpha_text.strip() else DEFAULT_ALPHA
        except ValueError:
            raise InputsError(f"alpha: {alpha_text!r} is not a number") from None
        if not (math.isfinite(alpha) and 0 < alpha <= 1):
            raise InputsError(f"alpha: must be in (0, 1], got {alpha_text}")
    return agent_pb2.StartMergeRequest(
        method=method, alpha=alpha, steps=inputs.steps, last=inputs.last, every=inputs.every, eval=evaluate
    )


# --- the result ---------------------------------------------------------------------------------------------

BAR = "█"
MARK = "│"
"""Where the merge's loss lies, drawn across every input's bar: bars that end left of it are better."""
MERGED_MARKER = "◆"


def val_loss_chart(inputs: Mapping[int, float], merged: float | None, width: int, accent: str = "") -> Text:
    """Each input's validation loss as a bar, the merge's last, with a line where the merge's falls.

    Lower is better. Bars start a little below the lowest loss, so the differences that matter fill the width.
    Below: the verdict in words (below or above the best and the newest input), so nothing rests on the bars.
    """
    steps = sorted(inputs)
    if merged is None and not steps:
        return Text("no validation loss: merge with 'validation loss' ticked to compare", style="dim")
    values = [inputs[s] for s in steps] + ([merged] if merged is not None else [])
    low, high = min(values), max(values)
    span = high - low or abs(high) * 0.05 or 1.0
    low -= span * 0.25
    label_width = max(len("merged"), *(len(f"step {s:,}") for s in steps)) if steps else len("merged")
    bar_width = max(5, width - label_width - 12)

    def cells(value: float) -> int:
        return max(1, round((value - low) / (high - low) * bar_width))

    mark = min(bar_width - 1, cells(merged) - 1) if merged is not None else None
    text = Text(no_wrap=True)
    text.append("validation loss, lower is better", style="bold")
    if merged is not None:
        text.append(f"  ({MARK} marks the merge's)", style="dim")
    for step in steps:
        bar = cells(inputs[step])
        text.append(f"\n{f'step {step:,}':>{label_width}} ")
        for column in range(bar_width):
            if column == mark:
                text.append(MARK, style="reverse" if column < bar else accent)
            elif column < bar:
                text.append(BAR)
            else:
                text.append(" ")
        text.append(f" {inputs[step]:.4f}")
    if merged is not None:
        text.append(f"\n{'merged':>{label_width}} ")
        text.append(BAR * cells(merged), style=f"bold {accent}".strip())
        text.append(" " * (bar_width - cells(merged)))
        text.append(f" {merged:.4f} {MERGED_MARKER}", style="bold")
        if steps:
            text.append("\n")
            text.append(verdict(inputs, merged))
    return text


def verdict(inputs: Mapping[int, float], merged: float) -> str:
    """The merge against its inputs in words: against the best input and against the newest."""
    best = min(inputs, key=lambda s: inputs[s])
    newest = max(inputs)
    if merged < inputs[best]:
        return f"the merge beats every input: {inputs[best] - merged:.4f} below the best (step {best:,})"
    against_newest = (
        f"{inputs[newest] - merged:.4f} below the newest (step {newest:,})"
        if merged < inputs[newest]
        else f"{merged - inputs[newest]:.4f} above the newest (step {newest:,})"
    )
    return f"the merge is {merged - inputs[best]:.4f} above the best input (step {best:,}), {against_newest}"
