"""What an agent knows about its node: bounded history, rank statuses, and the live subscribers.

Everything here runs on the agent's one asyncio loop, so there are no locks. History is bounded (an hour
of host samples at 1 Hz by default, a cap on step reports and events), so a dashboard that connects late is
back-filled and a long run never grows the agent's memory without bound.

A subscriber (one ``Watch`` stream) gets a :class:`Subscription`: messages accumulate there between the
stream's ticks and are sent as one batch, so a fast producer never means one gRPC message per report.
A subscriber that does not keep up loses its oldest pending step reports (latest data wins), counted.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message

from megascope.protos import events
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

_BACKFILL_CHUNK = 500
"""Kind of the event (no detail: nothing reads it but people) when a rank's stream ends without it finishing."""


@dataclass
class HistoryLimits:
    seconds: float = 3600.0
    """How far back host and GPU samples (1 Hz) are kept."""
    step_reports: int = 200_000
    events: int = 10_000
    pending_step_reports: int = 20_000
    """Per subscriber: step reports waiting to be sent before the oldest are dropped."""


@dataclass(eq=False)  # identity, not value: subscriptions live in a set
class Subscription:
    limit: int
    step_reports: deque[telemetry_pb2.StepReport] = field(default_factory=deque)
    host_samples: list[telemetry_pb2.HostSample] = field(default_factory=list)
    gpu_samples: list[telemetry_pb2.GpuSample] = field(default_factory=list)
    events: list[telemetry_pb2.Event] = field(default_factory=list)
    dropped: int = 0

    def add_step(self, report: telemetry_pb2.StepReport) -> None:
        self.step_reports.append(report)
        if len(self.step_reports) > self.limit:
            self.step_reports.popleft()
            self.dropped += 1


class RankListener(Protocol):
    """Told of every rank's lifecycle as it happens (the agent's supervisor: crash and hang detection).

    Lifecycle comes from the worker's own messages (hello, step reports, finished, failure, self-check), its
    guard's exit report and its stream ending; never from events, which are for people.
    """

    def rank_attached(self, hello: worker_pb2.Hello) -> None: ...
    def rank_stepped(self, report: telemetry_pb2.StepReport) -> None: ...
    def rank_detached(self, rank: int, pid: int, finished: bool) -> None: ...
    def rank_exited(self, report: worker_pb2.ExitReport) -> None: ...
    def rank_failed(self, report: worker_pb2.ExitReport) -> None: ...
    def self_checked(self, result: worker_pb2.SelfCheckResult) -> None: ...


class NodeState:
    def __init__(self, node_info: telemetry_pb2.NodeInfo, limits: HistoryLimits | None = None) -> None:
        self.node_info = node_info
        self.limits = limits or HistoryLimits()
        samples = max(1, int(self.limits.seconds))
        self.step_reports: deque[telemetry_pb2.StepReport] = deque(maxlen=self.limits.step_reports)
        self.host_samples: deque[telemetry_pb2.HostSample] = deque(maxlen=samples)
        self.gpu_samples: deque[telemetry_pb2.GpuSample] = deque(maxlen=samples * 8)
        self.events: deque[telemetry_pb2.Event] = deque(maxlen=self.limits.events)
        self.ranks: dict[int, telemetry_pb2.RankStatus] = {}
        self._finished: set[int] = set()
        self._subscribers: set[Subscription] = set()
        self.stack_files: dict[int, str] = {}
        """Each rank's stack dump file, from its Hello."""
        self.listener: RankListener | None = None

    # --- incoming ------------------------------------------------------------------------------------

    def add_step(self, report: telemetry_pb2.StepReport) -> None:
        self.step_reports.append(report)
        status = self._rank(report.rank)
        status.state = telemetry_pb2.RANK_STATE_RUNNING
        status.last_step = report.step
        status.last_heartbeat_wall_time = time.time()
        status.collectives_issued = report.collectives_issued
        for sub in self._subscribers:
            sub.add_step(report)
        if self.listener is not None:
            self.listener.rank_stepped(report)

    def add_host_sample(self, sample: telemetry_pb2.HostSample) -> None:
        self.host_samples.append(sample)
        for sub in self._subscribers:
            sub.host_samples.append(sample)

    def add_gpu_samples(self, samples: list[telemetry_pb2.GpuSample]) -> None:
        self.gpu_samples.extend(samples)
        for sub in self._subscribers:
            sub.gpu_samples.extend(samples)

    def add_event(self, event: telemetry_pb2.Event) -> None:
        if not event.node:
            event.node = self.node_info.node
        if not event.wall_time:
            event.wall_time = time.time()
        self.events.append(event)
        for sub in self._subscribers:
            sub.events.append(event)

    def event(
        self,
        text: str,
        detail: Message | None = None,
        *,
        kind: str = "",
        severity: int = events.INFO,
        rank: int | None = None,
        step: int | None = None,
    ) -> telemetry_pb2.Event:
        """Record an event of the agent's own: with a typed detail (its kind derived from it), or a bare ``kind``."""
        message = events.make_event(
            text, detail, kind=kind, severity=severity, node=self.node_info.node, rank=rank, step=step
        )
        self.add_event(message)
        return message

    def rank_attached(self, hello: worker_pb2.Hello) -> None:
        status = self._rank(hello.rank)
        status.pid = hello.pid
        status.state = telemetry_pb2.RANK_STATE_STARTING
        status.ClearField("last_step")
        status.last_heartbeat_wall_time = time.time()
        status.restart_count = hello.restart_count
        status.collectives_issued = 0
        status.exit_reason = ""
        self.stack_files[hello.rank] = hello.stack_file
        self._finished.discard(hello.rank)
        self.node_info.world_size = hello.world_size
        if hello.run_id and not self.node_info.run_id:
            self.node_info.run_id = hello.run_id
        self.node_info.ranks[:] = sorted(self.ranks)
        if self.listener is not None:
            self.listener.rank_attached(hello)

    def rank_heartbeat(self, heartbeat: telemetry_pb2.Heartbeat) -> None:
        status = self._rank(heartbeat.rank)
        status.last_heartbeat_wall_time = time.time()
        status.collectives_issued = max(status.collectives_issued, heartbeat.collectives_issued)

    def rank_exited(self, report: worker_pb2.ExitReport) -> None:
        """How a rank's process ended, from its guard (only abnormal ends are reported)."""
        status = self.ranks.get(report.rank)
        if status is not None and status.pid == report.pid:
            status.state = telemetry_pb2.RANK_STATE_FAILED
            status.exit_reason = report.signal or f"exit code {report.exit_code}"
        if self.listener is not None:
            self.listener.rank_exited(report)

    def rank_failed(self, report: worker_pb2.ExitReport) -> None:
        """The rank's own report that it is about to exit abnormally (its stream ends next)."""
        if self.listener is not None:
            self.listener.rank_failed(report)

    def rank_finished(self, rank: int) -> None:
        """The rank said it finished training; its stream ending next is a clean exit."""
        self._finished.add(rank)

    def self_checked(self, result: worker_pb2.SelfCheckResult) -> None:
        """A rank's self-check verdict for this node."""
        if self.listener is not None:
            self.listener.self_checked(result)

    def rank_detached(self, rank: int) -> None:
        status = self._rank(rank)
        finished = rank in self._finished
        if self.listener is not None:
            self.listener.rank_detached(rank, status.pid, finished)
        if finished:
            status.state = telemetry_pb2.RANK_STATE_EXITED
            return
        status.state = telemetry_pb2.RANK_STATE_FAILED
        last = f"step {status.last_step}" if status.HasField("last_step") else "before its first step"
        self.event(
            f"rank {rank} (pid {status.pid}) went away without finishing, {last}",
            kind=events.RANK_LOST,
            severity=events.WARNING,
            rank=rank,
        )

    def _rank(self, rank: int) -> telemetry_pb2.RankStatus:
        if rank not in self.ranks:
            self.ranks[rank] = telemetry_pb2.RankStatus(rank=rank, state=telemetry_pb2.RANK_STATE_STARTING)
            self.node_info.ranks[:] = sorted(self.ranks)
        return self.ranks[rank]

    # --- outgoing ------------------------------------------------------------------------------------

    def subscribe(self, backfill_seconds: float) -> tuple[Subscription, list[telemetry_pb2.Telemetry]]:
        """A new subscription and the back-fill batches it should send first.

        Both are taken in one synchronous step, so nothing arriving afterwards is missed or sent twice.
        """
        since = time.time() - backfill_seconds if backfill_seconds > 0 else 0.0
        backfill = list(self._backfill(since))
        sub = Subscription(limit=self.limits.pending_step_reports)
        self._subscribers.add(sub)
        return sub, backfill

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def take(self, sub: Subscription) -> telemetry_pb2.Telemetry:
        """Everything the subscription accumulated since the last take, as one live batch."""
        batch = self._telemetry(
            step_reports=list(sub.step_reports),
            host_samples=sub.host_samples,
            gpu_samples=sub.gpu_samples,
            events=sub.events,
        )
        sub.step_reports.clear()
        sub.host_samples, sub.gpu_samples, sub.events = [], [], []
        return batch

    def _backfill(self, since: float) -> Iterator[telemetry_pb2.Telemetry]:
        steps = [r for r in self.step_reports if r.wall_time >= since]
        host = [s for s in self.host_samples if s.wall_time >= since]
        gpu = [s for s in self.gpu_samples if s.wall_time >= since]
        events = [e for e in self.events if e.wall_time >= since]
        # Host, GPU and events go in the first batch; step reports, the bulk, in chunks.
        yield self._telemetry(
            step_reports=steps[:_BACKFILL_CHUNK], host_samples=host, gpu_samples=gpu, events=events, backfill=True
        )
        for start in range(_BACKFILL_CHUNK, len(steps), _BACKFILL_CHUNK):
            yield self._telemetry(step_reports=steps[start : start + _BACKFILL_CHUNK], backfill=True)

    def _telemetry(self, backfill: bool = False, **lists: list) -> telemetry_pb2.Telemetry:  # type: ignore[type-arg]
        return telemetry_pb2.Telemetry(
            **lists, backfill=backfill, node_info=self.node_info, rank_statuses=list(self.ranks.values())
        )

    def snapshot(self, recent_events: int = 100) -> agent_pb2.GetSnapshotResponse:
        latest: dict[int, telemetry_pb2.StepReport] = {}
        for report in reversed(self.step_reports):
            if report.rank not in latest:
                latest[report.rank] = report
            if len(latest) == len(self.ranks):
                break
        response = agent_pb2.GetSnapshotResponse(
            node_info=self.node_info,
            step_reports=[latest[rank] for rank in sorted(latest)],
            events=list(self.events)[-recent_events:],
            rank_statuses=list(self.ranks.values()),
        )
        if self.host_samples:
            response.host_sample.CopyFrom(self.host_samples[-1])
        if self.gpu_samples:
            newest = self.gpu_samples[-1].wall_time
            response.gpu_samples.extend(s for s in self.gpu_samples if s.wall_time == newest)
        return response

    def events_since(self, since: float, limit: int, kinds: set[str]) -> list[telemetry_pb2.Event]:
        selected = [e for e in self.events if e.wall_time >= since and (not kinds or e.kind in kinds)]
        return selected[-limit:] if limit > 0 else selected
