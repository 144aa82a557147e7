"""Aligning steps across ranks for the straggler rules: a step is judged once every rank that may report it has.

Reports arrive per agent, in batches, out of order. The straggler detector (``stragglers.py``) wants one step at
a time with every rank's timings, in step order. So reports wait here, by step, until every known rank has
reported that step (and every agent has spoken: its first batch names its ranks). A step does not wait for a
rank that already reported a later step (this one's report is lost), whose agent has sent ``PENDING_SECONDS`` of
batches without a report from it (it is gone), or whose agent is down: a vanished rank delays detection for the
others by seconds, not forever. The flags the detector raises and clears come back as events of kind
``straggler`` and ``straggler_cleared`` (a ``StragglerDetail``), which the model logs like any other.
"""

from __future__ import annotations

from collections.abc import Mapping

from megascope.dashboard.model.connections import AgentState
from megascope.dashboard.model.store import STEP_HISTORY, RankRecord
from megascope.dashboard.model.stragglers import StragglerDetector, StragglerFlag
from megascope.protos import events as wire_events
from megascope.protos.megascope.v1 import telemetry_pb2

PENDING_SECONDS = 5.0
"""A rank whose agent has kept sending for this long without a report from it is not waited for: steps are
judged without it (it vanished). Neither is a rank whose agent is disconnected."""
MAX_PENDING = STEP_HISTORY
"""Steps kept waiting for late reports at most; beyond this the oldest is judged with what it has."""


class StepAlignment:
    """Reports of steps not yet judged, and the order in which they go to the detector.

    ``ranks`` and ``agents`` are the model's own tables (shared, not copied): who may still report is read from
    them when a step is considered.
    """

    def __init__(
        self, detector: StragglerDetector, ranks: Mapping[int, RankRecord], agents: Mapping[str, AgentState]
    ) -> None:
        self.detector = detector
        self._ranks = ranks
        self._agents = agents
        self._pending: dict[int, dict[int, telemetry_pb2.StepReport]] = {}
        """step -> {rank: report} of steps not yet judged, waiting for every rank's report."""
        self._judged_step = 0
        """The last step handed to the detector; later reports of it or earlier steps are not."""

    def offer(self, report: telemetry_pb2.StepReport) -> None:
        """A rank's report: it waits for the other ranks' reports of its step, unless that step was judged."""
        if report.step > self._judged_step:
            self._pending.setdefault(report.step, {})[report.rank] = report

    def restart_from(self, rank: int, step: int) -> None:
        """``rank`` restarted from a checkpoint: the steps from ``step`` on are judged again when redone."""
        self._judged_step = min(self._judged_step, step - 1)
        self.detector.restart_from(step)
        for reports in self._pending.values():
            reports.pop(rank, None)

    def forget(self, ranks: list[int]) -> None:
        """``ranks`` left the job: nothing waits for them, and what they reported is not judged."""
        for reports in self._pending.values():
            for rank in ranks:
                reports.pop(rank, None)
        for step in [step for step, reports in self._pending.items() if not reports]:
            del self._pending[step]

    def judge(self) -> list[telemetry_pb2.Event]:
        """Hand every step that is complete (or waited long enough) to the detector, in order; the events of
        the flags it raised and cleared."""
        events: list[telemetry_pb2.Event] = []
        for step in sorted(self._pending):
            reports = self._pending[step]
            # The ranks we know of are those of the agents we watch: a dashboard on some of a job's agents
            # judges their ranks without waiting for the others.
            if self._waiting_for(reports, step) and len(self._pending) <= MAX_PENDING:
                break  # steps are judged in order: later ones wait for this one
            del self._pending[step]
            self._judged_step = step
            events += self._judge(step, [reports[rank] for rank in sorted(reports)])
        return events

    def _waiting_for(self, reports: dict[int, telemetry_pb2.StepReport], step: int) -> bool:
        """Whether a rank missing from ``reports`` may yet send its report of ``step``."""
        if any(a.batches == 0 and not a.down for a in self._agents.values()):
            return True  # an agent has not spoken yet: its ranks are not even known
        if len(reports) >= len(self._ranks):
            return False
        return any(rank not in reports and self._may_still_report(e, step) for rank, e in self._ranks.items())

    def _may_still_report(self, entry: RankRecord, step: int) -> bool:
        """Whether ``entry`` may yet send its report of ``step``: it has not moved past it and is not silent."""
        if entry.latest is not None and entry.latest.step > step:
            return False  # it reported a later step: this one's report is lost
        agent = self._agents.get(entry.agent)
        if agent is None or agent.down:
            return False
        # Silent while its own agent keeps talking: gone. (Measured against the agent, not the wall clock, so a
        # dashboard that stalled for a while does not take every rank for gone when the backlog arrives.)
        return agent.last_batch - entry.heard < PENDING_SECONDS

    def _judge(self, step: int, reports: list[telemetry_pb2.StepReport]) -> list[telemetry_pb2.Event]:
        devices = [r.device_compute_seconds for r in reports if r.HasField("device_compute_seconds")]
        wall_time = max(r.wall_time for r in reports)
        result = self.detector.observe_arrays(
            step,
            [r.rank for r in reports],
            [self._ranks[r.rank].node for r in reports],
            [r.step_seconds for r in reports],
            [r.forward_seconds + r.backward_seconds for r in reports],
            [r.data_wait_seconds for r in reports],
            [r.comm_wait_seconds for r in reports],
            [r.gc_pause_seconds for r in reports],
            devices if len(devices) == len(reports) else None,
            wall_time,
        )
        raised = [straggler_event(flag, wire_events.WARNING, flag.describe(), wall_time) for flag in result.raised]
        cleared = [
            straggler_event(
                flag,
                wire_events.INFO,
                f"rank {flag.rank} on {flag.node} is no longer a straggler ({flag.cleared_reason}); "
                f"flagged at step {flag.flagged_step}, slow since step {flag.since_step}",
                wall_time,
            )
            for flag in result.cleared
        ]
        return raised + cleared


def straggler_event(flag: StragglerFlag, severity: int, text: str, wall_time: float) -> telemetry_pb2.Event:
    """A raised flag (kind ``straggler``) or a cleared one (``straggler_cleared``: its detail has cleared_step)."""
    detail = telemetry_pb2.StragglerDetail(
        cause=flag.cause.value, ratio=flag.ratio, cost_seconds=flag.cost_seconds, since_step=flag.since_step,
        flagged_step=flag.flagged_step, cleared_reason=flag.cleared_reason, threshold=flag.threshold,
        node_wide=flag.node_wide,
    )  # fmt: skip
    if flag.cleared_step is not None:
        detail.cleared_step = flag.cleared_step
    step = flag.cleared_step if flag.cleared_step is not None else flag.flagged_step
    return wire_events.make_event(
        text, detail, severity=severity, node=flag.node, rank=flag.rank, step=step, wall_time=wall_time
    )
