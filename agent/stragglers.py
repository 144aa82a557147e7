"""This node's stragglers: the straggler rules (agent/straggler_rules.py) on the ranks this agent runs, as their
steps arrive.

The dashboard judges every rank of the job; an agent judges only the ranks of its own node. That is what it takes
to page and to export without a dashboard running: a rank slower than its node-mates is flagged here, by the one
agent that runs it, so each straggler is alerted once, by exactly one agent. The limits: a node slow as a whole
(every rank) looks normal to its own agent, since its ranks are only set against each other (the dashboard's
job-wide view sets them against the other nodes, and its slow-link rule needs three nodes); and a node with fewer
than ``StragglerConfig.min_ranks`` (3) ranks is not judged here at all.

Steps are aligned across the node's ranks: a step is judged once every rank that reports steps has reported it or
a later one. A rank that goes silent (crashed, stopped) holds judging up for at most ``MAX_PENDING`` steps; then
the oldest waiting step is judged with the reports it has, and the silent rank is not waited for again until it
reports. A rank whose step goes back (the job restarted from a checkpoint) starts the steps from there again.

The flags raised and cleared become the node's events, kinds ``straggler`` and ``straggler_cleared`` (a
``StragglerDetail``): the alert webhooks send them (agent/alerts.py), the record keeps them, and a dashboard, which
makes its own job-wide flags, leaves them out of its log. :meth:`NodeStragglers.active` is what ``/metrics`` shows
(agent/metrics.py), with each flag's cost kept current.

Cost: a dict insert per report; once per step, one pass of the rules over this node's ranks (O(ranks), numpy).
"""

from __future__ import annotations

from megascope.agent.state import NodeState
from megascope.agent.straggler_rules import DEFAULT_CONFIG, StragglerConfig, StragglerDetector, StragglerFlag
from megascope.protos import events
from megascope.protos.megascope.v1 import telemetry_pb2

MAX_PENDING = 8
"""Steps that wait for a silent rank's report at most; past this the oldest is judged without it."""


class NodeStragglers:
    """Judges the node's ranks step by step and records the flags as events. Call on the agent's loop."""

    def __init__(self, state: NodeState, config: StragglerConfig = DEFAULT_CONFIG) -> None:
        self.state = state
        self.detector = StragglerDetector(config)
        self._pending: dict[int, dict[int, telemetry_pb2.StepReport]] = {}
        """step -> {rank: report} of the steps not judged yet."""
        self._newest: dict[int, int] = {}
        """Each rank's newest step reported (in its current attempt)."""
        self._silent: set[int] = set()
        """Ranks left out of a step judged without them: not waited for until they report again."""
        self._judged_step: int | None = None

    def add_step(self, report: telemetry_pb2.StepReport) -> None:
        """A rank's step report (NodeState calls it for every report it keeps)."""
        rank, step = report.rank, report.step
        newest = self._newest.get(rank)
        if newest is not None and step <= newest:
            self._restart_from(rank, step)
        self._newest[rank] = step
        self._silent.discard(rank)
        if self._judged_step is not None and step <= self._judged_step:
            return  # a late report of a step already judged
        self._pending.setdefault(step, {})[rank] = report
        self._judge_ready()

    def active(self) -> list[StragglerFlag]:
        """The flags standing now, by rank, their ratio and cost as of the newest step judged."""
        return self.detector.active()

    def _restart_from(self, rank: int, step: int) -> None:
        """``rank`` reports ``step`` again: the job restarted from a checkpoint and redoes the steps from there."""
        self.detector.restart_from(step)
        if self._judged_step is not None:
            self._judged_step = min(self._judged_step, step - 1)
        # The node's ranks restart together: none has reported the redone step yet (their stale reports of the old
        # attempt are dropped as each of them comes back).
        for other, newest in self._newest.items():
            self._newest[other] = min(newest, step - 1)
        for step_reports in self._pending.values():
            step_reports.pop(rank, None)
        for empty in [s for s, step_reports in self._pending.items() if not step_reports]:
            del self._pending[empty]

    def _judge_ready(self) -> None:
        """Judge, in step order, every waiting step that all the node's reporting ranks have reached."""
        while self._pending:
            step = min(self._pending)
            reports = self._pending[step]
            waiting = [
                rank for rank, newest in self._newest.items()
                if rank not in reports and rank not in self._silent and newest < step
            ]  # fmt: skip
            if waiting and len(self._pending) <= MAX_PENDING:
                return
            self._silent.update(waiting)
            del self._pending[step]
            self._judged_step = step
            self._judge(step, [reports[rank] for rank in sorted(reports)])

    def _judge(self, step: int, reports: list[telemetry_pb2.StepReport]) -> None:
        node = self.state.node_info.node
        devices = [r.device_compute_seconds for r in reports if r.HasField("device_compute_seconds")]
        result = self.detector.observe_arrays(
            step,
            [r.rank for r in reports],
            [node] * len(reports),
            [r.step_seconds for r in reports],
            [r.forward_seconds + r.backward_seconds for r in reports],
            [r.data_wait_seconds for r in reports],
            [r.comm_wait_seconds for r in reports],
            [r.gc_pause_seconds for r in reports],
            devices if len(devices) == len(reports) else None,
            max(r.wall_time for r in reports),
        )
        among = f"judged among the {len(reports)} ranks of {node}"
        for flag in result.raised:
            self._record(flag, f"{flag.describe()} ({among})", events.WARNING)
        for flag in result.cleared:
            self._record(
                flag,
                f"rank {flag.rank} on {flag.node} is no longer a straggler ({flag.cleared_reason}); flagged at step "
                f"{flag.flagged_step}, slow since step {flag.since_step} ({among})",
                events.INFO,
            )

    def _record(self, flag: StragglerFlag, text: str, severity: int) -> None:
        """The flag as an event: kind ``straggler`` when raised, ``straggler_cleared`` (cleared_step set) when not."""
        detail = telemetry_pb2.StragglerDetail(
            cause=flag.cause.value, ratio=flag.ratio, cost_seconds=flag.cost_seconds, since_step=flag.since_step,
            flagged_step=flag.flagged_step, cleared_reason=flag.cleared_reason, threshold=flag.threshold,
            node_wide=flag.node_wide,
        )  # fmt: skip
        if flag.cleared_step is not None:
            detail.cleared_step = flag.cleared_step
        step = flag.cleared_step if flag.cleared_step is not None else flag.flagged_step
        self.state.event(text, detail, severity=severity, rank=flag.rank, step=step)
