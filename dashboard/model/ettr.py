"""The run's ETTR (effective training time ratio), live, from the step reports the dashboard receives.

The definition is bench/faults.py's, so the dashboard and the benchmark say the same thing: useful step time over
wall time. Useful step time: for each step index once, the execution of it the model went through (a step redone
after a fault replaces its earlier execution), its ``step_seconds``. Wall time: from the start of the first step
seen (its report's ``wall_time - step_seconds``) to the end of the newest. Detection, restarts, re-forming the group,
redone steps, checkpoints and gaps between steps count as wall time only.

One rank's view is enough (in a synchronous job every rank's steps take the same time, waits included): the lowest
rank that reports, rank 0 in practice. Memory is bounded: the newest ``WINDOW`` steps are kept one by one (a redone
step can replace them), older ones are folded into a sum. A restart from a checkpoint older than the window takes
the folded steps it redoes out at their mean time (they are no longer known one by one).
"""

from __future__ import annotations

from dataclasses import dataclass

from megascope.protos.megascope.v1 import telemetry_pb2

WINDOW = 1024
"""Steps kept one by one: a redo within them replaces exactly what it redoes."""


@dataclass
class _Execution:
    """The run of one step index the model went through."""

    seconds: float
    end: float
    """Wall time its report says it was done."""


class EttrTracker:
    """Useful step time and wall time of one rank's steps; fed every step report (``offer``), in any order."""

    def __init__(self, window: int = WINDOW) -> None:
        if window < 1:
            raise ValueError(f"EttrTracker: window must be at least 1 step, got {window}")
        self.window = window
        self.rank: int | None = None
        """The rank whose steps count: the lowest that has reported."""
        self._clear()

    def _clear(self) -> None:
        """Nothing counted yet (a new tracker, or a lower rank to count from now on)."""
        self._steps: dict[int, _Execution] = {}
        """Step index -> the execution the model went through, for the newest ``window`` steps."""
        self._window_seconds = 0.0
        """Sum of ``_steps``' seconds, kept as they change so reading the ETTR costs nothing."""
        self._folded_seconds = 0.0
        self._folded_steps = 0
        self._folded_through: int | None = None
        """The highest step folded into ``_folded_seconds``; a late copy of it or an older step is not placed."""
        self._start: float | None = None
        """Start of the earliest step seen."""
        self._end: float | None = None
        """End of the newest step seen (the largest ``wall_time``)."""
        self._newest_step: int | None = None
        """The step that ended at ``_end``: where the model stands."""
        self._attempt = 0
        """The newest attempt (torch elastic restart count) seen: a report of an older one is a late copy."""

    def offer(self, report: telemetry_pb2.StepReport) -> None:
        """Count ``report`` if it is the tracked rank's (a rank lower than any before starts the count afresh)."""
        if report.step_seconds <= 0 or report.wall_time <= 0:
            return  # no timing to count (a script that reports steps without times)
        if self.rank is None or report.rank < self.rank:
            self._clear()
            self.rank = report.rank
        if report.rank != self.rank or report.restart_count < self._attempt:
            return
        step, end, seconds = report.step, report.wall_time, report.step_seconds
        redo = self._is_redo(report)
        if redo:
            self._drop_from(step)  # the model went on from before these: they are not in its history any more
        else:
            if self._folded_through is not None and step <= self._folded_through:
                return  # a late copy of a step already folded into the sum
            known = self._steps.get(step)
            if known is not None and end <= known.end:
                return  # a replayed report (a reconnect's back-fill) or an older copy of this execution
        self._attempt = max(self._attempt, report.restart_count)
        old = self._steps.get(step)
        if old is not None:
            self._window_seconds -= old.seconds
        self._steps[step] = _Execution(seconds, end)
        self._window_seconds += seconds
        self._start = end - seconds if self._start is None else min(self._start, end - seconds)
        if self._end is None or end >= self._end:
            self._end, self._newest_step = end, step
        while len(self._steps) > self.window:
            self._fold_oldest()

    def ettr(self) -> float | None:
        """Useful step time over wall time, 0..1; None before a step with a time is known."""
        wall = self.wall_seconds()
        if wall is None or wall <= 0:
            return None
        return min(1.0, self.useful_seconds() / wall)

    def useful_seconds(self) -> float:
        """Each step index once, the execution the model went through, its seconds summed."""
        return self._folded_seconds + max(0.0, self._window_seconds)

    def wall_seconds(self) -> float | None:
        """From the start of the first step seen to the end of the newest; None before any."""
        return None if self._start is None or self._end is None else self._end - self._start

    def steps_kept(self) -> int:
        """Steps held one by one (at most ``window``)."""
        return len(self._steps)

    # -- internals ----------------------------------------------------------------------------------------

    def _is_redo(self, report: telemetry_pb2.StepReport) -> bool:
        """The model does ``report``'s step again: a newer attempt (restarted from a checkpoint), or, in the same
        attempt, a step at or before the newest done after it (recovered in place from an earlier step)."""
        if report.restart_count > self._attempt:
            return True
        return (
            self._newest_step is not None
            and self._end is not None
            and report.step <= self._newest_step
            and report.wall_time > self._end
        )

    def _drop_from(self, step: int) -> None:
        """Forget the executions of ``step`` and of every later step."""
        for later in [s for s in self._steps if s >= step]:
            self._window_seconds -= self._steps.pop(later).seconds
        if not self._steps:
            self._window_seconds = 0.0  # no float residue of the adds and subtracts
        folded = self._folded_through
        if folded is not None and step <= folded:
            # Redone from before the window: the folded steps it redoes come out at their mean time.
            redone = min(self._folded_steps, folded - step + 1)
            self._folded_seconds -= redone * self._folded_seconds / self._folded_steps
            self._folded_steps -= redone
            self._folded_through = step - 1 if self._folded_steps else None
            if not self._folded_steps:
                self._folded_seconds = 0.0

    def _fold_oldest(self) -> None:
        oldest = min(self._steps)
        self._folded_seconds += self._steps[oldest].seconds
        self._window_seconds -= self._steps.pop(oldest).seconds
        self._folded_steps += 1
        self._folded_through = oldest if self._folded_through is None else max(self._folded_through, oldest)
