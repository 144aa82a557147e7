"""The cluster model: every agent's telemetry merged into one picture, plus the views the screens draw.

Connections feed it ``Telemetry`` batches (``ingest``) and connection changes (``set_connecting`` ...);
renderers ask it for plain dataclass views (``header``, ``rank_rows``, ``node_rows``, ``events``,
``loss_history``, ``node_history``, ``straggler_flags``, ``heat_map``, ``rank_timeline``, ``faults``,
``restarts``). The agents' crash, hang and restart events (agent/supervision.py) become ``faults``: what died or
hung, how fast it was detected, and what the restart that ended it cost (MTTR, steps lost).

Straggler detection (``dashboard/model/stragglers.py``) runs here, as reports arrive: once every known rank has
reported a step (and every agent has spoken: its first batch names its ranks), the step's timings go to the
detector, and the flags it raises and clears become events of kind ``straggler`` and ``straggler_cleared``
with their rank. A step does not wait for a rank that already reported a later step (this one's report is
lost), whose agent has sent ``PENDING_SECONDS`` of batches without a report from it (it is gone), or whose
agent is disconnected: a vanished rank delays detection for the others by seconds, not forever.

It never blocks and never raises on odd input: batches may come out of order, twice (a reconnect replays the
agent's back-fill), empty, without node info, or about ranks nobody announced. Everything it keeps is bounded.

Pure Python (no Textual, no gRPC): the TUI and ``megascope status`` share it, and tests drive it directly.
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import statistics
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf.message import Message

from megascope.dashboard import formatting as fmt
from megascope.dashboard.model.stragglers import (
    DEFAULT_CONFIG,
    HeatMap,
    StragglerConfig,
    StragglerDetector,
    StragglerFlag,
)
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

K = TypeVar("K", int, float)
V = TypeVar("V")

STEP_HISTORY = 600
"""Step reports kept per rank (the loss plot and the throughput median read these)."""
HOST_HISTORY = 3600
"""Host samples kept per node, and samples per GPU: one hour at the agents' 1 Hz."""
EVENT_HISTORY = 1000
"""Events kept in the merged log."""
RECENT_STEPS = 10
"""Complete steps the throughput and ETA medians look back over."""
PENDING_SECONDS = 5.0
"""A rank whose agent has kept sending for this long without a report from it is not waited for: steps are
judged without it (it vanished). Neither is a rank whose agent is disconnected."""
MAX_PENDING = STEP_HISTORY
"""Steps kept waiting for late reports at most; beyond this the oldest is judged with what it has."""
FAULT_KINDS = ("crash", "hang", "restart", "job_failed")
"""The agents' fault-tolerance events (agent/supervision.py) the model keeps apart from the event log."""
FAULT_HISTORY = 500
"""Fault events kept: the event log lets go of old ones as other events come; these are few and all count."""


class ConnectionState(enum.Enum):
    CONNECTING = "CONNECTING"
    CONNECTED = "CONNECTED"
    DISCONNECTED = "DISCONNECTED"
    """Never reached, or its agent ended the stream itself (it was stopped)."""
    LOST = "LOST"
    """Was connected, then its stream broke or went silent for the heartbeat window: the node vanished."""


class RankStatusName(str, enum.Enum):
    """What the rank table shows: the agent's view of the process, overridden when the agent is gone."""

    RUNNING = "RUNNING"
    STARTING = "STARTING"
    EXITED = "EXITED"
    FAILED = "FAILED"
    HUNG = "HUNG"
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


class Bounded(Generic[K, V]):
    """Values ordered by a numeric key, keeping only the ``capacity`` largest keys.

    Putting an existing key replaces its value (so a replayed batch changes nothing); a key older than
    everything kept in a full series is dropped rather than evicting newer data.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: list[K] = []
        self._values: dict[K, V] = {}

    def put(self, key: K, value: V) -> bool:
        """Store ``value`` under ``key``; False when it was too old to keep."""
        if key in self._values:
            self._values[key] = value
            return True
        if len(self._keys) >= self.capacity and key < self._keys[0]:
            return False
        bisect.insort(self._keys, key)
        self._values[key] = value
        while len(self._keys) > self.capacity:
            del self._values[self._keys.pop(0)]
        return True

    def drop_from(self, key: K) -> None:
        """Forget every entry at or after ``key``."""
        cut = bisect.bisect_left(self._keys, key)
        for old in self._keys[cut:]:
            del self._values[old]
        del self._keys[cut:]

    def get(self, key: K) -> V | None:
        return self._values.get(key)

    def keys(self) -> list[K]:
        return list(self._keys)

    def values(self) -> list[V]:
        return [self._values[k] for k in self._keys]

    def items(self) -> Iterator[tuple[K, V]]:
        return ((k, self._values[k]) for k in self._keys)

    def last(self) -> V | None:
        return self._values[self._keys[-1]] if self._keys else None

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._keys)


M = TypeVar("M", bound=Message)


def _copy(message: M) -> M:
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


# ----------------------------------------------------------------------------------------------------------
# What the model keeps


@dataclass
class AgentState:
    """One agent the dashboard was told about, and how talking to it goes."""

    address: str
    state: ConnectionState = ConnectionState.CONNECTING
    error: str = ""
    """Why the last connection failed or ended; empty while none has."""
    since: float = 0.0
    """Wall time of the last state change."""
    batches: int = 0
    """Telemetry batches received over all connections."""
    last_batch: float = 0.0
    """Model clock when the last batch arrived."""
    ever_connected: bool = False

    @property
    def down(self) -> bool:
        """Disconnected or lost: its ranks cannot be seen, so nothing waits for them."""
        return self.state in (ConnectionState.DISCONNECTED, ConnectionState.LOST)


@dataclass
class _Node:
    """A node, known by the address of its agent (its name only arrives with node info)."""

    agent: str
    info: telemetry_pb2.NodeInfo | None = None
    host: Bounded[float, telemetry_pb2.HostSample] = field(default_factory=lambda: Bounded(HOST_HISTORY))
    gpus: dict[int, Bounded[float, telemetry_pb2.GpuSample]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.node if self.info is not None and self.info.node else self.agent


@dataclass
class _Rank:
    rank: int
    agent: str
    """Address of the agent that last spoke about this rank."""
    node: str
    latest: telemetry_pb2.StepReport | None = None
    history: Bounded[int, telemetry_pb2.StepReport] = field(default_factory=lambda: Bounded(STEP_HISTORY))
    status: telemetry_pb2.RankStatus | None = None
    heard: float = 0.0
    """Model clock when this rank was announced or last sent a report."""


@dataclass(order=True)
class _StoredEvent:
    sort_key: tuple[float, int]
    """(wall time, arrival id): the log is ordered by when things happened, ties by arrival."""
    id: int = field(compare=False)
    event: telemetry_pb2.Event = field(compare=False)
    dedup_key: tuple[object, ...] = field(compare=False)


# ----------------------------------------------------------------------------------------------------------
# What the model shows: plain dataclasses, shared by the TUI and `megascope status --json`


@dataclass(frozen=True)
class HeaderView:
    step: int | None
    """The last step every known rank has completed."""
    total_steps: int | None
    tokens_per_second: float | None
    """Job throughput: all ranks' tokens over the slowest rank's step time, median of recent complete steps."""
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
    """Restarts of the job: ``restart`` events seen (one per restart: only the node with rank 0 reports them)."""
    last_fault: FaultView | None = None
    """The newest crash or hang, with the restart that ended it once there is one."""
    job_failed: str | None = None
    """The text of the newest ``job_failed`` event (torch elastic gave up), when the job has given up."""


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
    attributes: dict[str, str] = field(default_factory=dict)
    """The event's figures, e.g. ``detect_seconds`` of a crash, ``mttr_seconds`` of a restart."""


@dataclass(frozen=True)
class RestartView:
    """One restart of the job, from its ``restart`` event: what it took to get back to training."""

    wall_time: float
    node: str
    cause: str
    """What was restarted after: "crash", "hang" or "manual"."""
    mttr_seconds: float | None
    """From the fault to the first step done after it."""
    steps_lost: int | None
    """Steps done before the fault that had to be redone (those after the checkpoint resumed from)."""
    resumed_step: int | None


@dataclass(frozen=True)
class FaultView:
    """A crash or hang an agent reported (``crash`` / ``hang`` event), and the restart that ended it."""

    kind: str
    """"crash" or "hang"."""
    wall_time: float
    node: str
    rank: int | None
    """The rank that died, or the hang's culprit; None when the agent found none."""
    step: int | None
    """The last step the job completed before the fault."""
    detect_seconds: float | None
    """From the fault (the death, or the last step before the hang) to its detection."""
    cause: str
    """How the rank died ("SIGKILL", "exit code 1") or why it is the hang's culprit."""
    text: str
    restart: RestartView | None = None
    """None until the job has done a step again after it."""

    def describe(self) -> str:
        """One line: what happened, where, how fast it was seen, what the restart cost, then why (a hang's
        reason is long, so it comes last where a narrow screen cuts it)."""
        line = f"{self.kind}: " + (f"rank {self.rank} on {self.node}" if self.rank is not None else self.node)
        if self.kind == "crash" and self.cause:
            line += f" ({self.cause})"
        if self.step is not None:
            line += f" after step {self.step:,}"
        if self.detect_seconds is not None:
            line += f", detected in {self.detect_seconds:.2f}s"
        restart = self.restart
        if restart is None:
            line += "; not restarted yet"
        else:
            line += "; restarted"
            if restart.resumed_step is not None:
                line += f" from step {restart.resumed_step:,}"
            if restart.mttr_seconds is not None:
                line += f", MTTR {restart.mttr_seconds:.1f}s"
            if restart.steps_lost is not None:
                line += f", {restart.steps_lost} step{'s' if restart.steps_lost != 1 else ''} lost"
        if self.kind != "crash":
            line += f"; {self.cause or 'no culprit found'}"
        return line


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


def _attribute(event: telemetry_pb2.Event, name: str, kind: Callable[[str], K]) -> K | None:
    """An event attribute as a number; None when absent or not a number (agents of other versions)."""
    try:
        return kind(event.attributes[name])
    except (KeyError, ValueError):
        return None


def _fault_view(event: telemetry_pb2.Event) -> FaultView:
    attributes = event.attributes
    if event.kind == "crash":
        code = attributes.get("exit_code", "")
        cause = attributes.get("signal", "") or (f"exit code {code}" if code else "")
    else:
        cause = attributes.get("reason", "")
    return FaultView(
        kind=event.kind,
        wall_time=event.wall_time,
        node=event.node,
        rank=event.rank if event.HasField("rank") else None,
        step=event.step if event.HasField("step") else _attribute(event, "last_step", int),
        detect_seconds=_attribute(event, "detect_seconds", float),
        cause=cause,
        text=event.text,
    )


def _restart_view(event: telemetry_pb2.Event) -> RestartView:
    return RestartView(
        wall_time=event.wall_time,
        node=event.node,
        cause=event.attributes.get("cause", ""),
        mttr_seconds=_attribute(event, "mttr_seconds", float),
        steps_lost=_attribute(event, "steps_lost", int),
        resumed_step=_attribute(event, "resumed_step", int),
    )


# ----------------------------------------------------------------------------------------------------------


class ClusterModel:
    """Every agent's telemetry, merged. Call from one thread (the event loop)."""

    def __init__(
        self,
        agents: Iterable[str] = (),
        *,
        clock: Callable[[], float] = time.time,
        log_connections: bool = True,
        stragglers: StragglerConfig = DEFAULT_CONFIG,
    ) -> None:
        self.clock = clock
        self.log_connections = log_connections
        """Add "connected" / "disconnected" / "node_lost" events of our own to the log (the live view wants them)."""
        self.agents: dict[str, AgentState] = {}
        self._nodes: dict[str, _Node] = {}
        self._ranks: dict[int, _Rank] = {}
        self._losses: Bounded[int, dict[int, float]] = Bounded(STEP_HISTORY)
        self._world_size_limit: int | None = None
        """Set when the job restarted with fewer ranks: ranks at or past it left the job."""
        """step -> {rank: loss}, kept as reports arrive so the loss plot costs O(steps) per frame."""
        self._events: list[_StoredEvent] = []
        self._event_keys: set[tuple[object, ...]] = set()
        self._next_event_id = 0
        self._checkpoint_saved: tuple[int, float] | None = None
        """(step, wall time) of the newest committed checkpoint the agents reported."""
        self._checkpoint_saving: tuple[int, float] | None = None
        """(step, wall time started) of a save in progress."""
        self._fault_events: list[_StoredEvent] = []
        """The FAULT_KINDS events, in time order (faults and restarts are paired by time, whatever the arrival)."""
        self._fault_keys: set[tuple[object, ...]] = set()
        self.version = 0
        """Bumped on every change, so a renderer can skip work when nothing moved."""
        self.stragglers = StragglerDetector(stragglers)
        self._pending: dict[int, dict[int, telemetry_pb2.StepReport]] = {}
        """step -> {rank: report} of steps not yet judged, waiting for every rank's report."""
        self._judged_step = 0
        """The last step handed to the straggler detector; later reports of it or earlier steps are not."""
        self._median_phases: Bounded[int, PhaseTimes] = Bounded(STEP_HISTORY)
        for address in agents:
            self.add_agent(address)

    # -- connection bookkeeping ---------------------------------------------------------------------------

    def add_agent(self, address: str) -> AgentState:
        if address not in self.agents:
            self.agents[address] = AgentState(address=address, since=self.clock())
            self._nodes[address] = _Node(agent=address)
            self.version += 1
        return self.agents[address]

    def set_connecting(self, address: str) -> None:
        agent = self.add_agent(address)
        if agent.state is not ConnectionState.CONNECTING:
            self._set_state(agent, ConnectionState.CONNECTING, agent.error)

    def set_connected(self, address: str) -> None:
        agent = self.add_agent(address)
        if agent.state is not ConnectionState.CONNECTED:
            self._set_state(agent, ConnectionState.CONNECTED, "")
            agent.ever_connected = True
            self._add_dashboard_event(address, telemetry_pb2.Event.SEVERITY_INFO, "connected", "agent connected")

    def set_disconnected(self, address: str, error: str, *, lost: bool = False) -> None:
        """The agent's stream ended, or could not be opened; ``lost``: it broke or went silent (not closed by the
        agent). Only a connected agent becomes LOST; a down agent keeps the state it went down in while retries
        fail, so a node that vanished stays LOST (and since when) until it answers again."""
        agent = self.add_agent(address)
        was_connected = agent.state is ConnectionState.CONNECTED
        if not agent.down:
            state = ConnectionState.LOST if lost and was_connected else ConnectionState.DISCONNECTED
            self._set_state(agent, state, error)
            self._judge_steps()  # steps waiting for this agent's ranks wait no more
        elif agent.error != error:
            agent.error = error  # still down, for a new reason: keep "since" at when it went down
            self.version += 1
        # Log the loss of a live agent once, not every failed retry after it.
        if was_connected and agent.state is ConnectionState.LOST:
            self._add_dashboard_event(address, telemetry_pb2.Event.SEVERITY_ERROR, "node_lost", f"agent lost: {error}")
        elif was_connected:
            self._add_dashboard_event(
                address, telemetry_pb2.Event.SEVERITY_ERROR, "disconnected", f"agent went away: {error}"
            )

    def _set_state(self, agent: AgentState, state: ConnectionState, error: str) -> None:
        agent.state = state
        agent.error = error
        agent.since = self.clock()
        self.version += 1

    def _add_dashboard_event(self, address: str, severity: int, kind: str, text: str) -> None:
        if not self.log_connections:
            return
        event = telemetry_pb2.Event(
            wall_time=self.clock(), node=self._nodes[address].name, kind=kind, severity=severity, text=text
        )
        event.attributes["agent"] = address
        self._add_event(event, self._nodes[address].name)

    # -- ingest -------------------------------------------------------------------------------------------

    def ingest(self, address: str, telemetry: telemetry_pb2.Telemetry) -> None:
        """Merge one batch from the agent at ``address``."""
        agent = self.add_agent(address)
        agent.batches += 1
        agent.last_batch = self.clock()
        node = self._nodes[address]
        if telemetry.HasField("node_info"):
            node.info = _copy(telemetry.node_info)
            for rank in node.info.ranks:
                self._rank(rank, address, node.name)
        # Messages are copied out of the batch: keeping a sub-message would keep its whole batch alive.
        for report in telemetry.step_reports:
            self._add_report(address, node, _copy(report))
        for sample in telemetry.host_samples:
            node.host.put(sample.wall_time, _copy(sample))
        for gpu in telemetry.gpu_samples:
            node.gpus.setdefault(gpu.index, Bounded(HOST_HISTORY)).put(gpu.wall_time, _copy(gpu))
        for event in telemetry.events:
            self._add_event(_copy(event), node.name)
        # Every batch carries the node's full rank table; the newest batch wins.
        for status in telemetry.rank_statuses:
            rank = self._rank(status.rank, address, node.name)
            rank.status = _copy(status)
        self._judge_steps()
        self.version += 1

    def ingest_snapshot(self, address: str, snapshot: agent_pb2.GetSnapshotResponse) -> None:
        """Merge a ``GetSnapshot`` reply (the same facts as one batch, without history)."""
        batch = telemetry_pb2.Telemetry(
            step_reports=snapshot.step_reports,
            gpu_samples=snapshot.gpu_samples,
            events=snapshot.events,
            rank_statuses=snapshot.rank_statuses,
        )
        if snapshot.HasField("node_info"):
            batch.node_info.CopyFrom(snapshot.node_info)
        if snapshot.HasField("host_sample"):
            batch.host_samples.append(snapshot.host_sample)
        self.ingest(address, batch)

    def _rank(self, rank: int, address: str, node_name: str) -> _Rank:
        entry = self._ranks.get(rank)
        if entry is None:
            entry = _Rank(rank=rank, agent=address, node=node_name, heard=self.clock())
            if self._world_size_limit is not None and rank >= self._world_size_limit:
                return entry  # a rank the job left behind, still in its old agent's tables: not kept
            self._ranks[rank] = entry
        entry.agent = address
        entry.node = node_name
        return entry

    def _add_report(self, address: str, node: _Node, report: telemetry_pb2.StepReport) -> None:
        if self._world_size_limit is not None and report.world_size > self._world_size_limit:
            self._world_size_limit = None  # the job grew again
        entry = self._rank(report.rank, address, report.node or node.name)
        entry.heard = self.clock()
        latest = entry.latest
        if latest is not None and report.restart_count < latest.restart_count:
            return  # a late report from before the rank restarted: superseded
        if latest is not None and report.restart_count > latest.restart_count:
            # Restarted from a checkpoint: steps from here on are being redone, forget the old attempt's.
            entry.history.drop_from(report.step)
            for step, losses_at in self._losses.items():
                if step >= report.step:
                    losses_at.pop(report.rank, None)
            entry.latest = None
            latest = None
            # The steps from here on are judged again when redone.
            self._judged_step = min(self._judged_step, report.step - 1)
            self.stragglers.restart_from(report.step)
            for reports in self._pending.values():
                reports.pop(report.rank, None)
        if report.step > self._judged_step:
            self._pending.setdefault(report.step, {})[report.rank] = report
        if entry.history.put(report.step, report):
            losses = self._losses.get(report.step)
            if losses is None:
                losses = {}
                if not self._losses.put(report.step, losses):
                    losses = {}  # older than the plot keeps: nowhere to add it
            losses[report.rank] = report.loss
        # Out-of-order batches must not move a rank backwards.
        if latest is None or report.step >= latest.step:
            entry.latest = report
        if report.restart_count > 0 and report.rank < report.world_size < len(self._ranks):
            self._forget_ranks_outside(report.world_size)

    def _forget_ranks_outside(self, world_size: int) -> None:
        """The job restarted smaller (a node lost or evicted, ``--nnodes MIN:MAX``): ranks past its world size
        are no longer in it, and the job's step, loss and throughput are its remaining ranks'."""
        self._world_size_limit = world_size
        for rank in [r for r in self._ranks if r >= world_size]:
            del self._ranks[rank]
            for reports in self._pending.values():
                reports.pop(rank, None)
            for losses_at in self._losses.values():
                losses_at.pop(rank, None)
        for step in [step for step, reports in self._pending.items() if not reports]:
            del self._pending[step]

    def _judge_steps(self) -> None:
        """Hand every step that is complete (or waited long enough) to the straggler detector, in order."""
        if not self._pending:
            return
        for step in sorted(self._pending):
            reports = self._pending[step]
            # The ranks we know of are those of the agents we watch: a dashboard on some of a job's agents
            # judges their ranks without waiting for the others.
            if self._waiting_for(reports, step) and len(self._pending) <= MAX_PENDING:
                break  # steps are judged in order: later ones wait for this one
            del self._pending[step]
            self._judged_step = step
            self._judge(step, [reports[rank] for rank in sorted(reports)])

    def _waiting_for(self, reports: dict[int, telemetry_pb2.StepReport], step: int) -> bool:
        """Whether a rank missing from ``reports`` may yet send its report of ``step``."""
        if any(a.batches == 0 and not a.down for a in self.agents.values()):
            return True  # an agent has not spoken yet: its ranks are not even known
        if len(reports) >= len(self._ranks):
            return False
        return any(rank not in reports and self._may_still_report(e, step) for rank, e in self._ranks.items())

    def _may_still_report(self, entry: _Rank, step: int) -> bool:
        """Whether ``entry`` may yet send its report of ``step``: it has not moved past it and is not silent."""
        if entry.latest is not None and entry.latest.step > step:
            return False  # it reported a later step: this one's report is lost
        agent = self.agents.get(entry.agent)
        if agent is None or agent.down:
            return False
        # Silent while its own agent keeps talking: gone. (Measured against the agent, not the wall clock, so a
        # dashboard that stalled for a while does not take every rank for gone when the backlog arrives.)
        return agent.last_batch - entry.heard < PENDING_SECONDS

    def _judge(self, step: int, reports: list[telemetry_pb2.StepReport]) -> None:
        devices = [r.device_compute_seconds for r in reports if r.HasField("device_compute_seconds")]
        wall_time = max(r.wall_time for r in reports)
        result = self.stragglers.observe_arrays(
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
        for flag in result.raised:
            self._straggler_event(flag, "straggler", telemetry_pb2.Event.SEVERITY_WARNING, flag.describe(), wall_time)
        for flag in result.cleared:
            text = (
                f"rank {flag.rank} on {flag.node} is no longer a straggler ({flag.cleared_reason}); "
                f"flagged at step {flag.flagged_step}, slow since step {flag.since_step}"
            )
            self._straggler_event(flag, "straggler_cleared", telemetry_pb2.Event.SEVERITY_INFO, text, wall_time)

    def _straggler_event(self, flag: StragglerFlag, kind: str, severity: int, text: str, wall_time: float) -> None:
        event = telemetry_pb2.Event(
            wall_time=wall_time, node=flag.node, kind=kind, severity=severity, rank=flag.rank,
            step=flag.cleared_step if flag.cleared_step is not None else flag.flagged_step, text=text,
        )  # fmt: skip
        event.attributes.update(
            {
                "cause": flag.cause.value,
                "ratio": f"{flag.ratio:.3f}",
                "cost_seconds": f"{flag.cost_seconds:.6f}",
                "since_step": str(flag.since_step),
            }
        )
        self._add_event(event, flag.node)

    def _add_event(self, event: telemetry_pb2.Event, node_name: str) -> None:
        if not event.node:
            event.node = node_name
        rank = event.rank if event.HasField("rank") else None
        dedup_key = (event.wall_time, event.node, event.kind, event.severity, rank, event.text)
        if dedup_key in self._event_keys:
            return  # replayed by a reconnect's back-fill
        stored = _StoredEvent(
            sort_key=(event.wall_time, self._next_event_id),
            id=self._next_event_id,
            event=event,
            dedup_key=dedup_key,
        )
        self._next_event_id += 1
        bisect.insort(self._events, stored)
        self._event_keys.add(dedup_key)
        self._track_checkpoint(event)
        self._track_fault(stored)
        while len(self._events) > EVENT_HISTORY:
            self._event_keys.discard(self._events.pop(0).dedup_key)
        self.version += 1

    def _track_checkpoint(self, event: telemetry_pb2.Event) -> None:
        if event.kind not in ("checkpoint_started", "checkpoint", "checkpoint_failed"):
            return
        try:
            step = int(event.attributes.get("step", ""))
        except ValueError:
            return  # not one of the engine's checkpoint events
        if event.kind == "checkpoint_started":
            if self._checkpoint_saved is None or step > self._checkpoint_saved[0]:
                self._checkpoint_saving = (step, event.wall_time)
            return
        if self._checkpoint_saving is not None and self._checkpoint_saving[0] == step:
            self._checkpoint_saving = None
        if event.kind == "checkpoint" and (self._checkpoint_saved is None or step >= self._checkpoint_saved[0]):
            self._checkpoint_saved = (step, event.wall_time)

    def _track_fault(self, stored: _StoredEvent) -> None:
        # Its own dedup: a replayed event the log had already let go of must not count as a second restart.
        if stored.event.kind not in FAULT_KINDS or stored.dedup_key in self._fault_keys:
            return
        bisect.insort(self._fault_events, stored)
        self._fault_keys.add(stored.dedup_key)
        while len(self._fault_events) > FAULT_HISTORY:
            self._fault_keys.discard(self._fault_events.pop(0).dedup_key)

    def newest_checkpoint_step(self) -> int | None:
        """The step of the newest committed checkpoint the agents reported; None before any."""
        return self._checkpoint_saved[0] if self._checkpoint_saved is not None else None

    def checkpoint_summary(self) -> str | None:
        """ "saving step 50" while a save runs, else "step 40, 12s ago"; None before any checkpoint event."""
        if self._checkpoint_saving is not None:
            return f"saving step {self._checkpoint_saving[0]}"
        if self._checkpoint_saved is not None:
            step, when = self._checkpoint_saved
            return f"step {step}, {fmt.duration(max(0.0, self.clock() - when))} ago"
        return None

    # -- views --------------------------------------------------------------------------------------------

    def known_ranks(self) -> list[int]:
        return sorted(self._ranks)

    def _rank_status(self, entry: _Rank) -> RankStatusName:
        agent = self.agents.get(entry.agent)
        if agent is not None and agent.state is ConnectionState.LOST:
            return RankStatusName.LOST
        if agent is None or agent.state is not ConnectionState.CONNECTED:
            # We cannot see the process any more; its last state might be long stale.
            return RankStatusName.DISCONNECTED
        if entry.status is not None:
            return _RANK_STATES.get(entry.status.state, RankStatusName.UNKNOWN)
        return RankStatusName.RUNNING if entry.latest is not None else RankStatusName.STARTING

    def _complete_steps(self, up_to: int) -> list[int]:
        """Recent steps (newest first, at most RECENT_STEPS) that every known rank has in its history."""
        ranks = list(self._ranks.values())
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

    def header(self) -> HeaderView:
        now = self.clock()
        ranks = list(self._ranks.values())
        step: int | None = None
        if ranks and all(r.latest is not None for r in ranks):
            step = min(r.latest.step for r in ranks if r.latest is not None)

        tokens_per_second = mfu = loss = step_seconds = eta = None
        if step is not None:
            rates, times = [], []
            for s in self._complete_steps(step):
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

        infos = [n.info for n in self._nodes.values() if n.info is not None]
        total_steps = max((i.total_steps for i in infos), default=0) or None
        if total_steps is not None and step is not None and step_seconds is not None:
            eta = max(0, total_steps - step) * step_seconds
        starts = [i.start_wall_time for i in infos if i.start_wall_time > 0]
        uptime = now - min(starts) if starts else None
        world_sizes = [i.world_size for i in infos if i.world_size > 0]
        world_sizes += [r.latest.world_size for r in ranks if r.latest is not None and r.latest.world_size > 0]
        run_ids = sorted({i.run_id for i in infos if i.run_id})
        return HeaderView(
            step=step,
            total_steps=total_steps,
            tokens_per_second=tokens_per_second,
            mfu=mfu,
            loss=loss,
            step_seconds=step_seconds,
            eta_seconds=eta,
            uptime_seconds=uptime,
            connected_agents=sum(a.state is ConnectionState.CONNECTED for a in self.agents.values()),
            total_agents=len(self.agents),
            known_ranks=len(ranks),
            world_size=max(world_sizes) if world_sizes else None,
            run_id=",".join(run_ids),
            stragglers=len(self.stragglers.active()),
            checkpoint=self.checkpoint_summary(),
            restarts=sum(1 for s in self._fault_events if s.event.kind == "restart"),
            last_fault=faults[-1] if (faults := self.faults()) else None,
            job_failed=self._job_failed(),
        )

    def rank_rows(self) -> list[RankRow]:
        flags = {flag.rank: flag for flag in self.stragglers.active()}
        latest_times = [r.latest.step_seconds for r in self._ranks.values() if r.latest is not None]
        median_time = statistics.median(latest_times) if latest_times else 0.0
        rows = []
        for rank in sorted(self._ranks):
            entry = self._ranks[rank]
            rep = entry.latest
            if rep is None:
                step = step_ms = data = comm = loss = tps = mfu = ratio = None
                restarts = 0
            else:
                step, loss, tps, restarts = rep.step, rep.loss, rep.tokens_per_second, rep.restart_count
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
                    restarts=restarts,
                    pid=pid,
                    status=self._rank_status(entry),
                    step_time_ratio=ratio,
                    straggler=flags.get(rank),
                    exit_reason=exit_reason,
                )
            )
        return rows

    def node_rows(self) -> list[NodeRow]:
        return [self._node_row(node) for node in self._nodes.values()]

    def _node_row(self, node: _Node) -> NodeRow:
        agent = self.agents[node.agent]
        host = node.host.last()
        gpus = [g for series in node.gpus.values() if (g := series.last()) is not None]
        info = node.info
        ranks = tuple(sorted(r.rank for r in self._ranks.values() if r.agent == node.agent))
        return NodeRow(
            node=node.name,
            agent=node.agent,
            hostname=info.hostname if info is not None else "",
            connection=agent.state,
            connection_error=agent.error,
            connection_since=agent.since,
            ranks=ranks,
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

    def node_agents(self) -> list[str]:
        return list(self._nodes)

    def node_history(self, agent: str) -> NodeHistory | None:
        node = self._nodes.get(agent)
        if node is None:
            return None
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
            agent=agent,
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

    def straggler_flags(self, active_only: bool = False) -> list[StragglerFlag]:
        """Flags standing now, or (by default) every flag raised, oldest first, cleared ones included."""
        return self.stragglers.active() if active_only else self.stragglers.history()

    def heat_map(self, steps: int) -> HeatMap:
        """The last ``steps`` judged steps: every rank's compute time over the median rank's."""
        return self.stragglers.heat(steps)

    def rank_timeline(self, rank: int, steps: int) -> RankTimeline | None:
        """``rank``'s phases over its last ``steps`` reported steps beside the median rank's; None if unknown."""
        entry = self._ranks.get(rank)
        if entry is None:
            return None
        keys = entry.history.keys()[-steps:]
        medians = [self._median_phases_at(step) for step in keys]
        flag = next((f for f in self.stragglers.active() if f.rank == rank), None)
        return RankTimeline(
            rank=rank,
            node=entry.node,
            steps=keys,
            rank_phases=[PhaseTimes.of(report) if (report := entry.history.get(s)) is not None else None for s in keys],
            median_phases=medians,
            straggler=flag,
        )

    def _median_phases_at(self, step: int) -> PhaseTimes:
        """Each phase's median over the ranks that reported ``step``; cached once every rank has."""
        cached = self._median_phases.get(step)
        if cached is not None:
            return cached
        reports = [report for r in self._ranks.values() if (report := r.history.get(step)) is not None]
        phases = [PhaseTimes.of(report) for report in reports]
        median = PhaseTimes(
            *(statistics.median(getattr(p, name) for p in phases) for name in PhaseTimes.__dataclass_fields__)
        )
        if len(reports) == len(self._ranks):
            self._median_phases.put(step, median)
        return median

    def faults(self) -> list[FaultView]:
        """Every crash and hang the agents reported, oldest first; each with the first restart after it (one
        restart ends every fault before it: the ranks that died of a peer's crash go down in the same incident)."""
        faults: list[FaultView] = []
        open_from = 0
        for stored in self._fault_events:
            event = stored.event
            if event.kind in ("crash", "hang"):
                faults.append(_fault_view(event))
            elif event.kind == "restart":
                restart = _restart_view(event)
                faults[open_from:] = [dataclasses.replace(f, restart=restart) for f in faults[open_from:]]
                open_from = len(faults)
        return faults

    def restarts(self) -> list[RestartView]:
        """Every restart of the job, oldest first."""
        return [_restart_view(s.event) for s in self._fault_events if s.event.kind == "restart"]

    def _job_failed(self) -> str | None:
        """The newest ``job_failed`` text, unless the job restarted after it (a new attempt under the same agents)."""
        for stored in reversed(self._fault_events):
            if stored.event.kind == "restart":
                return None
            if stored.event.kind == "job_failed":
                return stored.event.text
        return None

    def loss_history(self) -> list[tuple[int, float]]:
        """(step, mean loss over the ranks that reported that step), oldest first."""
        return [(step, sum(losses.values()) / len(losses)) for step, losses in self._losses.items() if losses]

    def events(self, limit: int | None = None) -> list[EventRow]:
        """The merged event log, oldest first; the newest ``limit`` when given."""
        stored: Sequence[_StoredEvent] = self._events if limit is None else self._events[-limit:]
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
                attributes=dict(s.event.attributes),
            )
            for s in stored
        ]

    # -- sizes, for tests and for the curious --------------------------------------------------------------

    def history_sizes(self) -> dict[str, int]:
        """The largest of each bounded store (tests check these stay bounded)."""
        return {
            "steps_per_rank": max((len(r.history) for r in self._ranks.values()), default=0),
            "host_samples_per_node": max((len(n.host) for n in self._nodes.values()), default=0),
            "gpu_samples_per_gpu": max((len(s) for n in self._nodes.values() for s in n.gpus.values()), default=0),
            "events": len(self._events),
        }
