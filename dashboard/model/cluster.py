"""The cluster model: every agent's telemetry merged into one picture. The façade of the model package.

Connections feed it ``Telemetry`` batches (``ingest``) and connection changes (``set_connecting`` ...);
renderers ask it for plain dataclass views (``header``, ``rank_rows``, ``node_rows``, ``events``,
``loss_history``, ``node_history``, ``straggler_flags``, ``heat_map``, ``rank_timeline``, ``faults``,
``restarts``, ``recoveries``). The work is done in the package beside it, a module per concern:

    store.py           bounded containers and the records kept per node and rank
    connections.py     the link to each agent (CONNECTING, CONNECTED, DISCONNECTED, LOST)
    step_alignment.py  which step the straggler rules judge next, once every rank has reported it
    stragglers.py      the straggler rules
    incidents.py       faults (crash, hang) paired with restarts and recoveries in place, the job giving up,
                       checkpoints
    ettr.py            the run's effective training time ratio, from one rank's step reports
    views.py           what the screens and ``megascope status`` draw, and the functions that build it

This module owns the records and the order of things: ingest, de-duplication, a rank's restart from a
checkpoint, a job that shrank. It never blocks and never raises on odd input: batches may come out of order,
twice (a reconnect replays the agent's back-fill), empty, without node info, or about ranks nobody announced.
Everything it keeps is bounded.

Pure Python (no Textual, no gRPC): the TUI and ``megascope status`` share it, and tests drive it directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from megascope.dashboard.model import store, views
from megascope.dashboard.model.connections import AgentState, Connections, ConnectionState, LinkChange
from megascope.dashboard.model.ettr import EttrTracker
from megascope.dashboard.model.incidents import FaultView, Incidents, RecoveryView, RestartView
from megascope.dashboard.model.step_alignment import MAX_PENDING, PENDING_SECONDS, StepAlignment
from megascope.dashboard.model.store import Bounded, NodeRecord, RankRecord, StoredEvent, copy_message
from megascope.dashboard.model.stragglers import (
    DEFAULT_CONFIG,
    HeatMap,
    StragglerConfig,
    StragglerDetector,
    StragglerFlag,
)
from megascope.dashboard.model.views import (
    SEVERITY_TAGS,
    EventRow,
    HeaderView,
    NodeHistory,
    NodeRow,
    PhaseTimes,
    RankRow,
    RankStatusName,
    RankTimeline,
)
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

# The names callers (screens, `megascope status`, tests) have always imported from here.
__all__ = [
    "MAX_PENDING",
    "PENDING_SECONDS",
    "SEVERITY_TAGS",
    "AgentState",
    "Bounded",
    "ClusterModel",
    "ConnectionState",
    "EventRow",
    "FaultView",
    "HeaderView",
    "NodeHistory",
    "NodeRow",
    "PhaseTimes",
    "RankRow",
    "RankStatusName",
    "RankTimeline",
    "RecoveryView",
    "RestartView",
]


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
        self.version = 0
        """Bumped on every change, so a renderer can skip work when nothing moved."""
        self._connections = Connections(clock, self._bump)
        self._nodes: dict[str, NodeRecord] = {}
        """By agent address."""
        self._ranks: dict[int, RankRecord] = {}
        self._losses: Bounded[int, dict[int, float]] = Bounded(store.STEP_HISTORY)
        """step -> {rank: loss}, kept as reports arrive so the loss plot costs O(steps) per frame."""
        self._world_size_limit: int | None = None
        """Set when the job restarted with fewer ranks: ranks at or past it left the job."""
        self._events = store.EventLog(lambda: store.EVENT_HISTORY)
        self._next_event_id = 0
        self._incidents = Incidents()
        self._ettr = EttrTracker()
        self.stragglers = StragglerDetector(stragglers)
        self._alignment = StepAlignment(self.stragglers, self._ranks, self._connections.agents)
        self._median_phases: Bounded[int, PhaseTimes] = Bounded(store.STEP_HISTORY)
        for address in agents:
            self.add_agent(address)

    @property
    def agents(self) -> dict[str, AgentState]:
        """Every agent the dashboard was told about, by address."""
        return self._connections.agents

    def _bump(self) -> None:
        self.version += 1

    # -- connection bookkeeping ---------------------------------------------------------------------------

    def add_agent(self, address: str) -> AgentState:
        agent, new = self._connections.add(address)
        if new:
            self._nodes[address] = NodeRecord(agent=address)
        return agent

    def set_connecting(self, address: str) -> None:
        self.add_agent(address)
        self._connections.set_connecting(address)

    def set_connected(self, address: str) -> None:
        self.add_agent(address)
        self._log_link(self._connections.set_connected(address))

    def set_disconnected(self, address: str, error: str, *, lost: bool = False) -> None:
        """The agent's stream ended, or could not be opened; ``lost``: it broke or went silent (not closed by the
        agent). See connections.py for the states."""
        self.add_agent(address)
        job_done = self._incidents.node_finished(self._nodes[address].name)
        went_down, change = self._connections.set_disconnected(address, error, lost=lost, job_done=job_done)
        if went_down:
            self._judge_steps()  # steps waiting for this agent's ranks wait no more
        self._log_link(change)

    def _log_link(self, change: LinkChange | None) -> None:
        if change is None or not self.log_connections:
            return
        node = self._nodes[change.address].name
        self._add_event(change.event(node, self.clock()), node)

    # -- ingest -------------------------------------------------------------------------------------------

    def ingest(self, address: str, telemetry: telemetry_pb2.Telemetry) -> None:
        """Merge one batch from the agent at ``address``."""
        self.add_agent(address)
        self._connections.received(address)
        node = self._nodes[address]
        if telemetry.HasField("node_info"):
            node.info = copy_message(telemetry.node_info)
            for rank in node.info.ranks:
                self._rank(rank, address, node.name)
        # Messages are copied out of the batch: keeping a sub-message would keep its whole batch alive.
        for report in telemetry.step_reports:
            self._add_report(address, node, copy_message(report))
        for sample in telemetry.host_samples:
            node.host.put(sample.wall_time, copy_message(sample))
        for gpu in telemetry.gpu_samples:
            node.add_gpu_sample(copy_message(gpu))
        for event in telemetry.events:
            if event.WhichOneof("detail") == "straggler":
                # The agent's flags among its own node's ranks (for its alerts and /metrics): this model judges every
                # rank of the job itself, and logging both would show each straggler twice.
                continue
            self._add_event(copy_message(event), node.name)
        # Every batch carries the node's full rank table; the newest batch wins.
        for status in telemetry.rank_statuses:
            rank = self._rank(status.rank, address, node.name)
            rank.status = copy_message(status)
            if status.restart_count > rank.attempt:
                # The agent already sees the restarted process: the old attempt's step and status are stale
                # from now on, not from the new attempt's first step (which may be a minute of loading away).
                self._new_attempt(rank, status.restart_count, resume_step=None)
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

    def _rank(self, rank: int, address: str, node_name: str) -> RankRecord:
        entry = self._ranks.get(rank)
        if entry is None:
            entry = RankRecord(rank=rank, agent=address, node=node_name, heard=self.clock())
            if self._world_size_limit is not None and rank >= self._world_size_limit:
                return entry  # a rank the job left behind, still in its old agent's tables: not kept
            self._ranks[rank] = entry
        entry.agent = address
        entry.node = node_name
        return entry

    def _add_report(self, address: str, node: NodeRecord, report: telemetry_pb2.StepReport) -> None:
        if self._world_size_limit is not None and report.world_size > self._world_size_limit:
            self._world_size_limit = None  # the job grew again
        entry = self._rank(report.rank, address, report.node or node.name)
        entry.heard = self.clock()
        if report.restart_count < entry.attempt:
            return  # a late report from before the rank restarted: superseded
        if report.restart_count > entry.attempt or entry.resume_pending:
            if entry.latest is None and not entry.history and not entry.resume_pending:
                entry.attempt = report.restart_count  # the first we hear of this rank: nothing older to forget
            else:
                self._new_attempt(entry, report.restart_count, resume_step=report.step)
        latest = entry.latest
        self._ettr.offer(report)
        self._alignment.offer(report)
        if entry.history.put(report.step, report):
            losses = self._losses.get(report.step)
            if losses is None:
                losses = {}
                if not self._losses.put(report.step, losses):
                    losses = {}  # older than the plot keeps: nowhere to add it
            losses[report.rank] = report.loss
        # Out-of-order batches must not move a rank backwards.
        if latest is None or report.step >= latest.step:
            if latest is None or report.step > latest.step:
                entry.stepped = self.clock()
            entry.latest = report
        if report.restart_count > 0 and report.rank < report.world_size < len(self._ranks):
            self._forget_ranks_outside(report.world_size)

    def _new_attempt(self, entry: RankRecord, attempt: int, resume_step: int | None) -> None:
        """``entry``'s process was restarted (attempt ``attempt``): its row starts afresh. Once the first step of
        the new attempt is known, the steps from there on are being redone: the old attempt's are forgotten."""
        entry.attempt = attempt
        entry.latest = None
        entry.resume_pending = resume_step is None
        if resume_step is None:
            return
        entry.history.drop_from(resume_step)
        for step, losses_at in self._losses.items():
            if step >= resume_step:
                losses_at.pop(entry.rank, None)
        self._alignment.restart_from(entry.rank, resume_step)

    def _forget_ranks_outside(self, world_size: int) -> None:
        """The job restarted smaller (a node lost or evicted, ``--nnodes MIN:MAX``): ranks past its world size
        are no longer in it, and the job's step, loss and throughput are its remaining ranks'."""
        self._world_size_limit = world_size
        gone = [r for r in self._ranks if r >= world_size]
        for rank in gone:
            del self._ranks[rank]
            for losses_at in self._losses.values():
                losses_at.pop(rank, None)
        self._alignment.forget(gone)

    def _judge_steps(self) -> None:
        """Judge every step that is ready; the straggler flags raised and cleared go into the log."""
        for event in self._alignment.judge():
            self._add_event(event, event.node)

    def _add_event(self, event: telemetry_pb2.Event, node_name: str) -> None:
        if not event.node:
            event.node = node_name
        stored = StoredEvent(
            sort_key=(event.wall_time, self._next_event_id),
            id=self._next_event_id,
            event=event,
            dedup_key=store.dedup_key(event),
        )
        if not self._events.add(stored):
            return  # replayed by a reconnect's back-fill
        self._next_event_id += 1
        self._incidents.track(stored)
        self.version += 1

    # -- views --------------------------------------------------------------------------------------------

    def known_ranks(self) -> list[int]:
        return sorted(self._ranks)

    def header(self) -> HeaderView:
        ranks = list(self._ranks.values())
        progress = views.job_progress(ranks)
        infos = [n.info for n in self._nodes.values() if n.info is not None]
        total_steps = max((i.total_steps for i in infos), default=0) or None
        eta = None
        if total_steps is not None and progress.step is not None and progress.step_seconds is not None:
            eta = max(0, total_steps - progress.step) * progress.step_seconds
        starts = [i.start_wall_time for i in infos if i.start_wall_time > 0]
        world_sizes = [i.world_size for i in infos if i.world_size > 0]
        world_sizes += [r.latest.world_size for r in ranks if r.latest is not None and r.latest.world_size > 0]
        faults = self._incidents.faults()
        finished = self._incidents.job_finished([n.name for n in self._nodes.values() if n.info is not None])
        stepped = [r.stepped for r in ranks if r.latest is not None]
        last_step_age = self.clock() - max(stepped) if stepped else None
        stalled = (
            finished is None
            and last_step_age is not None
            and last_step_age > views.stall_threshold(progress.step_seconds)
        )
        if finished is not None or stalled:
            eta = None  # nothing left to do, or no telling when the job will move again
        return HeaderView(
            step=progress.step,
            total_steps=total_steps,
            tokens_per_second=progress.tokens_per_second,
            mfu=progress.mfu,
            loss=progress.loss,
            step_seconds=progress.step_seconds,
            eta_seconds=eta,
            uptime_seconds=self.clock() - min(starts) if starts else None,
            connected_agents=self._connections.connected(),
            total_agents=len(self.agents),
            known_ranks=len(ranks),
            world_size=max(world_sizes) if world_sizes else None,
            run_id=",".join(sorted({i.run_id for i in infos if i.run_id})),
            stragglers=len(self.stragglers.active()),
            checkpoint=self.checkpoint_summary(),
            restarts=self._incidents.restart_count(),
            ettr=self._ettr.ettr(),
            last_fault=faults[-1] if faults else None,
            job_failed=self._incidents.job_failed(),
            finished=finished,
            last_step_age=last_step_age,
            stalled=stalled,
        )

    def stalled(self) -> bool:
        """No rank has stepped for the stall threshold while the job runs (see views.stall_threshold)."""
        return self.header().stalled

    def rank_rows(self) -> list[RankRow]:
        return views.rank_rows(self._ranks, self.agents, self.stragglers.active(), self.clock())

    def node_rows(self) -> list[NodeRow]:
        return [self._node_row(node) for node in self._nodes.values()]

    def _node_row(self, node: NodeRecord) -> NodeRow:
        ranks = [r.rank for r in self._ranks.values() if r.agent == node.agent]
        return views.node_row(node, self.agents[node.agent], ranks)

    def node_agents(self) -> list[str]:
        return list(self._nodes)

    def node_history(self, agent: str) -> NodeHistory | None:
        node = self._nodes.get(agent)
        return views.node_history(node) if node is not None else None

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
        return views.rank_timeline(entry, steps, self._ranks, self.stragglers.active(), self._median_phases)

    def faults(self) -> list[FaultView]:
        """Every crash and hang the agents reported, oldest first; each with the first restart after it (one
        restart ends every fault before it: the ranks that died of a peer's crash go down in the same incident)."""
        return self._incidents.faults()

    def restarts(self) -> list[RestartView]:
        """Every restart of the job, recoveries in place included, oldest first."""
        return self._incidents.restarts()

    def recoveries(self) -> list[RecoveryView]:
        """Every recovery in place (``recovered`` event, with its breakdown), oldest first."""
        return self._incidents.recoveries()

    def newest_checkpoint_step(self) -> int | None:
        """The step of the newest committed checkpoint the agents reported; None before any."""
        return self._incidents.newest_checkpoint_step()

    def checkpoint_summary(self) -> str | None:
        """ "saving step 50" while a save runs, else "step 40, 12s ago"; None before any checkpoint event."""
        return self._incidents.checkpoint_summary(self.clock())

    def loss_history(self) -> list[tuple[int, float]]:
        """(step, mean loss over the ranks that reported that step), oldest first."""
        return [(step, sum(losses.values()) / len(losses)) for step, losses in self._losses.items() if losses]

    def training_series(self) -> views.TrainingSeries:
        """Each rank's loss, and lr, grad norm and the script's own scalars, over the steps kept (the plots)."""
        return views.training_series(self._ranks)

    def events(self, limit: int | None = None) -> list[EventRow]:
        """The merged event log, oldest first; the newest ``limit`` when given."""
        return views.event_rows(self._events.newest(limit))

    # -- sizes, for tests and for the curious --------------------------------------------------------------

    def history_sizes(self) -> dict[str, int]:
        """The largest of each bounded store (tests check these stay bounded)."""
        return {
            "steps_per_rank": max((len(r.history) for r in self._ranks.values()), default=0),
            "host_samples_per_node": max((len(n.host) for n in self._nodes.values()), default=0),
            "gpu_samples_per_gpu": max((len(s) for n in self._nodes.values() for s in n.gpus.values()), default=0),
            "events": len(self._events),
        }
