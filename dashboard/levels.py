"""Green / yellow / red: the thresholds every view colours by, in one place so the help screen can list them.

A value is OK (green), WARN (yellow) or BAD (red). Colour is never the only signal: the TUI also appends a
text marker (``!`` for WARN, ``!!`` for BAD) and status words carry their meaning themselves.
Pure Python, shared by the TUI and ``megascope status``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Level(enum.Enum):
    OK = "ok"
    WARN = "warn"
    BAD = "bad"


# The text that goes with each colour, so a colour-blind user or a monochrome terminal loses nothing.
MARKERS: dict[Level, str] = {Level.OK: "", Level.WARN: "!", Level.BAD: "!!"}
COLOUR_NAMES: dict[Level, str] = {Level.OK: "green", Level.WARN: "yellow", Level.BAD: "red"}


@dataclass(frozen=True)
class Threshold:
    """Where a metric turns yellow and where it turns red."""

    name: str
    unit: str
    warn: float
    """At or beyond this the value is WARN."""
    bad: float
    """At or beyond this the value is BAD."""
    higher_is_worse: bool = True
    """False for metrics where a low value is the problem (GPU utilisation)."""

    def level(self, value: float | None) -> Level | None:
        """The level of ``value``; None when there is no value to judge."""
        if value is None:
            return None
        if self.higher_is_worse:
            if value >= self.bad:
                return Level.BAD
            return Level.WARN if value >= self.warn else Level.OK
        if value <= self.bad:
            return Level.BAD
        return Level.WARN if value <= self.warn else Level.OK

    def describe(self) -> str:
        """One line for the help screen, e.g. ``green < 80 %, yellow 80-95 %, red >= 95 %``."""
        unit = self.unit
        if self.higher_is_worse:
            return f"green < {self.warn:g}{unit}, yellow {self.warn:g}-{self.bad:g}{unit}, red >= {self.bad:g}{unit}"
        return f"green > {self.warn:g}{unit}, yellow {self.bad:g}-{self.warn:g}{unit}, red <= {self.bad:g}{unit}"


# In a synchronous job every rank's step lasts about as long (the fast ones wait for the slow one), so a longer
# step than the median rank's means a rank is behind, not that it is the straggler: COMPUTE_RATIO and the
# straggler rules (dashboard/model/stragglers.py) find that one.
STEP_TIME_RATIO = Threshold("step time / median rank's", "x", 1.10, 1.25)
# The heat map's colours. Yellow starts at the straggler rules' default threshold (StragglerConfig.threshold).
COMPUTE_RATIO = Threshold("compute time / median rank's (heat map)", "x", 1.05, 1.25)
DATA_WAIT = Threshold("data wait (share of step)", "%", 5, 20)
COMM_WAIT = Threshold("exposed comm wait (share of step)", "%", 10, 30)
CPU = Threshold("node CPU", "%", 80, 95)
MEMORY = Threshold("node memory used", "%", 80, 90)
GPU_UTIL = Threshold("GPU utilisation", "%", 70, 30, higher_is_worse=False)
GPU_MEMORY = Threshold("GPU memory used", "%", 90, 97)
GPU_TEMPERATURE = Threshold("GPU temperature", " C", 80, 87)

THRESHOLDS: tuple[Threshold, ...] = (
    STEP_TIME_RATIO,
    COMPUTE_RATIO,
    DATA_WAIT,
    COMM_WAIT,
    CPU,
    MEMORY,
    GPU_UTIL,
    GPU_MEMORY,
    GPU_TEMPERATURE,
)

# Rank statuses, agent connection states and event severities map to levels by name.
STATUS_LEVELS: dict[str, Level] = {
    "RUNNING": Level.OK,
    "EXITED": Level.OK,
    "STARTING": Level.WARN,
    "UNKNOWN": Level.WARN,
    "SLOW": Level.WARN,  # running, but flagged as a straggler: "SLOW <cause>" in the rank table
    "STOPPED": Level.WARN,  # stopped by its agent on purpose (a requested restart): coming back
    "STALLED": Level.WARN,  # no step for a few median step times: a hang in the making
    "HUNG": Level.BAD,
    "FAILED": Level.BAD,
    "DISCONNECTED": Level.BAD,
    "LOST": Level.BAD,
}
CONNECTION_LEVELS: dict[str, Level] = {
    "CONNECTED": Level.OK,
    "CONNECTING": Level.WARN,
    "DISCONNECTED": Level.BAD,
    "LOST": Level.BAD,
}
SEVERITY_LEVELS: dict[str, Level | None] = {
    "INFO": None,
    "WARN": Level.WARN,
    "ERROR": Level.BAD,
    "CRIT": Level.BAD,
}
