"""What the cluster model shows, and how it is worked out: plain dataclasses, shared by the TUI and
``megascope status --json``, and the functions that build them from what the model keeps (``store.py``).

The builders are pure functions of the records handed to them: the cluster model (``cluster.py``) owns the
records and calls these; nothing here keeps state but the median-phases cache it is handed.
"""

from __future__ import annotations

import enum
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megascope.dashboard.model.connections import AgentState, ConnectionState
from megascope.dashboard.model.incidents import FaultView, RecoveryView, is_recovery, recovery_view
from megascope.dashboard.model.store import Bounded, NodeRecord, RankRecord, StoredEvent
from megascope.dashboard.model.stragglers import StragglerFlag
from megascope.protos import events as wire_events
from megascope.protos.megascope.v1 import telemetry_pb2

RECENT_STEPS = 10
"""Complete steps the throughput and ETA medians look back over."""
STALL_STEPS = 3.0
"""A rank with no new step for this many median step times is STALLED (the agents' hang verdict comes at 5)."""
STALL_MIN_SECONDS = 5.0
"""... and for at least this long: fast steps jitter by more than three of themselves."""


def stall_threshold(step_seconds: float | None) -> float:
    """Seconds without a new step after which a running rank is STALLED."""
    return max(STALL_MIN_SECONDS, STALL_STEPS * (step_seconds or 0.0))


class RankStatusName(str, enum.Enum):
    """What the rank table shows: the agent's view of the process, overridden when the agent is gone."""

    RUNNING = "RUNNING"
    STARTING = "STARTING"
    EXITED = "EXITED"
    FAILED = "FAILED"
    HUNG = "HUNG"
    STOPPED = "STOPPED"
    """Stopped by its agent on purpose (a requested restart, a hang's remedy): it did not fail."""
    STALLED = "STALLED"
    """Running, by its agent's account, but no new step for a few median step times: a hang in the making, shown
    well before the agents' hang timeout gives its verdict."""
    DISCONNECTED = "DISCONNECTED"
    LOST = "LOST"
    """Its node's agent was lost (see ConnectionState.LOST)."""
    UNKNOWN = "UNKNOWN"


_RANK_STATES: dict[int, RankStatusName] = {
    telemetry_pb2.RANK_STATE_STARTING: RankStatusName.STARTING,
    telemetry_pb2.RANK_STATE_RUNNING: RankStatusName.RUNNING,
    telemetry_pb2.RANK_STATE_EXITED: RankStatusName.EXITED,
    telemetry_pb2.RANK_STATE_FAILED: RankStatusName.FAILED,
    telemetry_pb2.RANK_STATE_HUNG: RankStatusName.HUNG,
}

# Short tags for the event log; each is shown as text next to its colour.
SEVERITY_TAGS: dict[int, str] = {
    telemetry_pb2.Event.SEVERITY_UNSPECIFIED: "INFO",
    telemetry_pb2.Event.SEVERITY_INFO: "INFO",
    telemetry_pb2.Event.SEVERITY_WARNING: "WARN",
    telemetry_pb2.Event.SEVERITY_ERROR: "ERROR",
    telemetry_pb2.Event.SEVERITY_CRITICAL: "CRIT",
}


@dataclass(frozen=True)
class HeaderView:
    step: int | None
    """The last step every known rank has completed."""
    total_steps: int | None
    tokens_per_second: float | None
    """Job throughput: all ranks' tokens over the slowest rank's step time, median of recent complete steps (the
    run's last figure once it finished: the header shows no live rate then, the headless summary reports it)."""
    mfu: float | None
    """Mean over ranks at ``step``, 0..1; None when no rank reports it."""
    loss: float | None
    """Mean over ranks at ``step``."""
    step_seconds: float | None
    """Median over recent complete steps of the slowest rank's step time."""
    eta_seconds: float | None
    uptime_seconds: float | None
    connected_agents: int
    total_agents: int
    known_ranks: int
    world_size: int | None
    run_id: str
    stragglers: int = 0
    """Straggler flags standing now."""
    checkpoint: str | None = None
    """The newest checkpoint or the save in progress (see ClusterModel.checkpoint_summary)."""
    restarts: int = 0
    """Restarts of the job: ``restart`` events seen (one per restart: only the node with rank 0 reports them),
    recoveries in place included (a ``recovered`` event counts once, with its restart event or alone)."""
    ettr: float | None = None
    """The run's effective training time ratio, 0..1: useful step time (each step once, the execution the model
    went through) over wall time from the start of the first step seen to the end of the newest (model/ettr.py;
    bench/faults.py's definition). None before a step with a time."""
    last_fault: FaultView | None = None
    """The newest crash or hang, with the restart that ended it once there is one."""
    job_failed: str | None = None
    """The text of the newest ``job_failed`` event (torch elastic gave up), when the job has given up."""
    finished: float | None = None
    """When the job finished (every node's ranks ended cleanly), Unix seconds; None while it runs."""
    last_step_age: float | None = None
    """Seconds since any rank last reported a new step; None before the first."""
    stalled: bool = False
    """No rank has stepped for the stall threshold (see stall_threshold) while the job runs."""


@dataclass(frozen=True)
class RankRow:
    rank: int
    node: str
    agent: str
    step: int | None
    step_ms: float | None
    data_wait_percent: float | None
    comm_wait_percent: float | None
    loss: float | None
    tokens_per_second: float | None
    mfu: float | None
    restarts: int
    pid: int | None
    status: RankStatusName
    step_time_ratio: float | None
    """This rank's latest step time over the median rank's (in a synchronous job all ranks' are about equal)."""
    straggler: StragglerFlag | None = None
    """The straggler flag standing on this rank, if any."""
    exit_reason: str = ""
    """How the rank's process last failed ("SIGKILL", "exit code 1"); empty unless it failed."""
    last_step_at: float | None = None
    """Model clock when the rank's latest new step arrived (the rank table's "last step" age); None before one."""
    process_only: bool = False
    """Only its rank guard reports on it (an unmodified script): alive, output, CPU time, how it ended; no steps
    until the script calls ``megascope.api.step()``."""


@dataclass(frozen=True)
class NodeRow:
    node: str
    agent: str
    hostname: str
    connection: ConnectionState
    connection_error: str
    connection_since: float
    ranks: tuple[int, ...]
    cpu_percent: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    disk_read_bytes_per_second: float | None
    disk_write_bytes_per_second: float | None
    net_recv_bytes_per_second: float | None
    net_sent_bytes_per_second: float | None
    gpu_available: bool | None
    """None until the agent has said."""
    gpu_status: str
    gpu_count: int
    gpu_utilization_percent: float | None
    """Mean over the node's GPUs."""
    gpu_memory_used_bytes: int | None
    gpu_memory_total_bytes: int | None
    gpu_temperature_celsius: float | None
    """Hottest GPU."""
    gpu_power_watts: float | None
    """Sum over the node's GPUs."""

    @property
    def memory_percent(self) -> float | None:
        if self.memory_used_bytes is None or not self.memory_total_bytes:
            return None
        return 100.0 * self.memory_used_bytes / self.memory_total_bytes

    @property
    def gpu_memory_percent(self) -> float | None:
        if self.gpu_memory_used_bytes is None or not self.gpu_memory_total_bytes:
            return None
        return 100.0 * self.gpu_memory_used_bytes / self.gpu_memory_total_bytes


@dataclass(frozen=True)
class EventRow:
    id: int
    """Unique within this model; stable while the event is kept (the event table keys rows by it)."""
    wall_time: float
    node: str
    severity: str
    """INFO, WARN, ERROR or CRIT."""
    kind: str
    rank: int | None
    step: int | None
    text: str
    detail: dict[str, Any] = field(default_factory=dict)
    """The event's typed detail as plain values (``megascope.protos.events.detail_fields``), for display and
    JSON: e.g. ``detect_seconds`` of a crash, ``mttr_seconds`` of a restart. Programs read the typed detail."""
    recovery: RecoveryView | None = None
    """A ``recovered`` event's breakdown, read from its typed detail (the detail screen shows it in words)."""


@dataclass(frozen=True)
class NodeHistory:
    """Oldest-first series for one node's sparklines."""

    node: str
    agent: str
    cpu_percent: list[float]
    memory_percent: list[float]
    disk_bytes_per_second: list[float]
    """Read plus write."""
    net_bytes_per_second: list[float]
    """Receive plus send."""
    gpu_utilization_percent: list[float]
    """Mean over the node's GPUs per sample time; empty without GPUs."""
    gpu_memory_percent: list[float]
    span_seconds: float
    """Time the host series covers."""


@dataclass(frozen=True)
class PhaseTimes:
    """One step's time split into phases, in seconds (they add up to the step time)."""

    data: float
    forward: float
    backward: float
    comm: float
    """Blocked on communication after the rank's own compute: mostly waiting for slower ranks."""
    optimizer: float
    other: float

    @property
    def total(self) -> float:
        return self.data + self.forward + self.backward + self.comm + self.optimizer + self.other

    @classmethod
    def of(cls, report: telemetry_pb2.StepReport) -> PhaseTimes:
        return cls(
            data=report.data_wait_seconds, forward=report.forward_seconds, backward=report.backward_seconds,
            comm=report.comm_wait_seconds, optimizer=report.optimizer_seconds, other=report.other_seconds,
        )  # fmt: skip


@dataclass(frozen=True)
class RankTimeline:
    """A rank's last steps beside the median rank's (each phase's median over the ranks at that step)."""

    rank: int
    node: str
    steps: list[int]
    """Oldest first."""
    rank_phases: list[PhaseTimes | None]
    """None where this rank has no report for the step."""
    median_phases: list[PhaseTimes]
    straggler: StragglerFlag | None


# ----------------------------------------------------------------------------------------------------------
# Builders


@dataclass(frozen=True)
class JobProgress:
    """Where the job as a whole is: the header's figures that come from the step reports."""

    step: int | None
    tokens_per_second: float | None
    mfu: float | None
    loss: float | None
    step_seconds: float | None


def _complete_steps(ranks: Sequence[RankRecord], up_to: int) -> list[int]:
    """Recent steps (newest first, at most RECENT_STEPS) that every known rank has in its history."""
    if not ranks:
        return []
    candidates = [s for s in reversed(ranks[0].history.keys()) if s <= up_to]
    complete: list[int] = []
    for step in candidates:
        if all(step in r.history for r in ranks):
            complete.append(step)
            if len(complete) == RECENT_STEPS:
                break
    return complete


def job_progress(ranks: Sequence[RankRecord]) -> JobProgress:
    """The last step every rank completed, and the job's throughput, step time, loss and MFU around it."""
    step: int | None = None
    if ranks and all(r.latest is not None for r in ranks):
        step = min(r.latest.step for r in ranks if r.latest is not None)
    tokens_per_second = mfu = loss = step_seconds = None
    if step is not None:
        rates, times = [], []
        for s in _complete_steps(ranks, step):
            reports = [r.history.get(s) for r in ranks]
            slowest = max(rep.step_seconds for rep in reports if rep is not None)
            if slowest > 0:
                rates.append(sum(rep.tokens for rep in reports if rep is not None) / slowest)
                times.append(slowest)
        tokens_per_second = statistics.median(rates) if rates else None
        step_seconds = statistics.median(times) if times else None
        at_step = [rep for r in ranks if (rep := r.history.get(step)) is not None]
        if at_step:
            loss = statistics.fmean(rep.loss for rep in at_step)
            mfus = [rep.mfu for rep in at_step if rep.HasField("mfu")]
            mfu = statistics.fmean(mfus) if mfus else None
    return JobProgress(step, tokens_per_second, mfu, loss, step_seconds)


def rank_status(
    entry: RankRecord, agent: AgentState | None, now: float | None = None, stall_after: float | None = None
) -> RankStatusName:
    """The agent's view of the rank's process, unless the agent is out of sight; RUNNING becomes STALLED when the
    rank has not stepped for ``stall_after`` seconds by ``now``."""
    if agent is not None and agent.state is ConnectionState.LOST:
        return RankStatusName.LOST
    if agent is None or agent.state is not ConnectionState.CONNECTED:
        # We cannot see the process any more; its last state might be long stale.
        return RankStatusName.DISCONNECTED
    if entry.status is not None:
        status = _RANK_STATES.get(entry.status.state, RankStatusName.UNKNOWN)
        if status is RankStatusName.EXITED and entry.status.exit_reason.startswith("stopped"):
            status = RankStatusName.STOPPED
    else:
        status = RankStatusName.RUNNING if entry.latest is not None else RankStatusName.STARTING
    stalled = (
        status is RankStatusName.RUNNING
        and entry.latest is not None
        and now is not None
        and stall_after is not None
        and now - entry.stepped > stall_after
    )
    return RankStatusName.STALLED if stalled else status


def rank_rows(
    ranks: Mapping[int, RankRecord],
    agents: Mapping[str, AgentState],
    flags: Sequence[StragglerFlag],
    now: float | None = None,
) -> list[RankRow]:
    by_rank = {flag.rank: flag for flag in flags}
    latest_times = [r.latest.step_seconds for r in ranks.values() if r.latest is not None]
    median_time = statistics.median(latest_times) if latest_times else 0.0
    stall_after = stall_threshold(median_time)
    rows = []
    for rank in sorted(ranks):
        entry = ranks[rank]
        rep = entry.latest
        if rep is None:
            step = step_ms = data = comm = loss = tps = mfu = ratio = None
        else:
            step, loss, tps = rep.step, rep.loss, rep.tokens_per_second
            step_ms = rep.step_seconds * 1000.0
            share = 100.0 / rep.step_seconds if rep.step_seconds > 0 else None
            data = rep.data_wait_seconds * share if share is not None else None
            comm = rep.comm_wait_seconds * share if share is not None else None
            mfu = rep.mfu if rep.HasField("mfu") else None
            ratio = rep.step_seconds / median_time if median_time > 0 else None
        pid = entry.status.pid if entry.status is not None and entry.status.pid else None
        exit_reason = entry.status.exit_reason if entry.status is not None else ""
        rows.append(
            RankRow(
                rank=rank,
                node=entry.node,
                agent=entry.agent,
                step=step,
                step_ms=step_ms,
                data_wait_percent=data,
                comm_wait_percent=comm,
                loss=loss,
                tokens_per_second=tps,
                mfu=mfu,
                restarts=entry.attempt,
                pid=pid,
                status=rank_status(entry, agents.get(entry.agent), now, stall_after),
                step_time_ratio=ratio,
                straggler=by_rank.get(rank),
                exit_reason=exit_reason,
                last_step_at=entry.stepped if rep is not None and entry.stepped else None,
                process_only=rep is None
                and entry.status is not None
                and entry.status.source == telemetry_pb2.RANK_SOURCE_PROCESS,
            )
        )
    return rows


def node_row(node: NodeRecord, agent: AgentState, ranks: Sequence[int]) -> NodeRow:
    host = node.host.last()
    gpus = [g for series in node.gpus.values() if (g := series.last()) is not None]
    info = node.info
    return NodeRow(
        node=node.name,
        agent=node.agent,
        hostname=info.hostname if info is not None else "",
        connection=agent.state,
        connection_error=agent.error,
        connection_since=agent.since,
        ranks=tuple(sorted(ranks)),
        cpu_percent=host.cpu_percent if host else None,
        memory_used_bytes=host.memory_used_bytes if host else None,
        memory_total_bytes=host.memory_total_bytes if host else None,
        disk_read_bytes_per_second=host.disk_read_bytes_per_second if host else None,
        disk_write_bytes_per_second=host.disk_write_bytes_per_second if host else None,
        net_recv_bytes_per_second=host.net_recv_bytes_per_second if host else None,
        net_sent_bytes_per_second=host.net_sent_bytes_per_second if host else None,
        gpu_available=info.gpu_available if info is not None else (True if gpus else None),
        gpu_status=info.gpu_status if info is not None else "",
        gpu_count=len(gpus),
        gpu_utilization_percent=statistics.fmean(g.utilization_percent for g in gpus) if gpus else None,
        gpu_memory_used_bytes=sum(g.memory_used_bytes for g in gpus) if gpus else None,
        gpu_memory_total_bytes=sum(g.memory_total_bytes for g in gpus) if gpus else None,
        gpu_temperature_celsius=max(g.temperature_celsius for g in gpus) if gpus else None,
        gpu_power_watts=sum(g.power_watts for g in gpus) if gpus else None,
    )


def node_history(node: NodeRecord) -> NodeHistory:
    samples = node.host.values()
    # Group GPU samples by second so GPUs sampled in the same tick average into one point.
    gpu_util: dict[int, list[float]] = {}
    gpu_mem: dict[int, list[float]] = {}
    for series in node.gpus.values():
        for wall_time, g in series.items():
            second = int(wall_time)
            gpu_util.setdefault(second, []).append(g.utilization_percent)
            if g.memory_total_bytes > 0:
                gpu_mem.setdefault(second, []).append(100.0 * g.memory_used_bytes / g.memory_total_bytes)
    return NodeHistory(
        node=node.name,
        agent=node.agent,
        cpu_percent=[s.cpu_percent for s in samples],
        memory_percent=[
            100.0 * s.memory_used_bytes / s.memory_total_bytes if s.memory_total_bytes else 0.0 for s in samples
        ],
        disk_bytes_per_second=[s.disk_read_bytes_per_second + s.disk_write_bytes_per_second for s in samples],
        net_bytes_per_second=[s.net_recv_bytes_per_second + s.net_sent_bytes_per_second for s in samples],
        gpu_utilization_percent=[statistics.fmean(gpu_util[k]) for k in sorted(gpu_util)],
        gpu_memory_percent=[statistics.fmean(gpu_mem[k]) for k in sorted(gpu_mem)],
        span_seconds=samples[-1].wall_time - samples[0].wall_time if samples else 0.0,
    )


def rank_timeline(
    entry: RankRecord,
    steps: int,
    ranks: Mapping[int, RankRecord],
    flags: Sequence[StragglerFlag],
    cache: Bounded[int, PhaseTimes],
) -> RankTimeline:
    """``entry``'s phases over its last ``steps`` reported steps beside the median rank's."""
    keys = entry.history.keys()[-steps:]
    return RankTimeline(
        rank=entry.rank,
        node=entry.node,
        steps=keys,
        rank_phases=[PhaseTimes.of(report) if (report := entry.history.get(s)) is not None else None for s in keys],
        median_phases=[median_phases_at(step, ranks, cache) for step in keys],
        straggler=next((f for f in flags if f.rank == entry.rank), None),
    )


def median_phases_at(step: int, ranks: Mapping[int, RankRecord], cache: Bounded[int, PhaseTimes]) -> PhaseTimes:
    """Each phase's median over the ranks that reported ``step``; cached once every rank has."""
    cached = cache.get(step)
    if cached is not None:
        return cached
    reports = [report for r in ranks.values() if (report := r.history.get(step)) is not None]
    phases = [PhaseTimes.of(report) for report in reports]
    median = PhaseTimes(
        *(statistics.median(getattr(p, name) for p in phases) for name in PhaseTimes.__dataclass_fields__)
    )
    if len(reports) == len(ranks):
        cache.put(step, median)
    return median


def event_rows(stored: Sequence[StoredEvent]) -> list[EventRow]:
    return [
        EventRow(
            id=s.id,
            wall_time=s.event.wall_time,
            node=s.event.node,
            severity=SEVERITY_TAGS.get(s.event.severity, "INFO"),
            kind=s.event.kind,
            rank=s.event.rank if s.event.HasField("rank") else None,
            step=s.event.step if s.event.HasField("step") else None,
            text=s.event.text,
            detail=wire_events.detail_fields(s.event),
            recovery=recovery_view(s.event) if is_recovery(s.event) else None,
        )
        for s in stored
    ]


# ----------------------------------------------------------------------------------------------------------
# Training curves (the plots screen, ``g``)


@dataclass(frozen=True)
class TrainingSeries:
    """What the step reports say about training, oldest step first, over the steps the model keeps per rank."""

    loss_by_rank: dict[int, list[tuple[int, float]]]
    """Each rank's own loss: in data parallelism each rank sees other data, so their curves differ."""
    loss: list[tuple[int, float]]
    """The mean over the ranks that reported each step."""
    lr: list[tuple[int, float]]
    grad_norm: list[tuple[int, float]]
    """Mean over ranks (after the all-reduce every rank's is the same)."""
    scalars: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    """The script's own scalars (``StepReport.scalars``), each the mean over the ranks that sent it."""


def training_series(ranks: Mapping[int, RankRecord]) -> TrainingSeries:
    by_rank: dict[int, list[tuple[int, float]]] = {}
    per_step: dict[int, list[telemetry_pb2.StepReport]] = {}
    for rank in sorted(ranks):
        reports = ranks[rank].history.values()
        by_rank[rank] = [(r.step, r.loss) for r in reports]
        for report in reports:
            per_step.setdefault(report.step, []).append(report)
    steps = sorted(per_step)

    def mean(pick: str) -> list[tuple[int, float]]:
        return [(s, statistics.fmean(getattr(r, pick) for r in per_step[s])) for s in steps]

    scalars: dict[str, list[tuple[int, float]]] = {}
    for step in steps:
        values: dict[str, list[float]] = {}
        for report in per_step[step]:
            for name, value in report.scalars.items():
                values.setdefault(name, []).append(value)
        for name, found in values.items():
            scalars.setdefault(name, []).append((step, statistics.fmean(found)))
    return TrainingSeries(
        loss_by_rank=by_rank, loss=mean("loss"), lr=mean("lr"), grad_norm=mean("grad_norm"),
        scalars=dict(sorted(scalars.items())),
    )  # fmt: skip


SMOOTHING_WEIGHTS = (0.0, 0.6, 0.9, 0.99)
"""The smoothing steps ``e`` goes through (TensorBoard's slider, in four stops); 0 is the raw curve."""


def ema(points: Sequence[tuple[int, float]], weight: float) -> list[tuple[int, float]]:
    """TensorBoard's smoothing: an exponential moving average, debiased so the curve does not start at zero."""
    if weight <= 0.0:
        return list(points)
    out, last, debias = [], 0.0, 1.0
    for step, value in points:
        last = weight * last + (1.0 - weight) * value
        debias *= weight
        out.append((step, last / (1.0 - debias)))
    return out
