"""What an agent knows about its node: bounded history, rank statuses, and the live subscribers.

Everything here runs on the agent's one asyncio loop, so there are no locks. History is bounded (an hour
of host samples at 1 Hz by default, a cap on the count and the bytes of step reports and events), so a dashboard
that connects late is back-filled and a long run never grows the agent's memory without bound.

No answer is built larger than a client can receive (gRPC's default limit is 4 MiB): Watch batches are split
at :data:`WATCH_BATCH_BYTES` (and built as the stream sends them), and GetSnapshot/GetEvents stay under
:data:`MAX_ANSWER_BYTES`, leaving out events and saying how many.

A subscriber (one ``Watch`` stream) gets a :class:`Subscription`: messages accumulate there between the
stream's ticks and are sent as one batch, so a fast producer never means one gRPC message per report.
A subscriber that does not keep up loses its oldest pending step reports (latest data wins), counted.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf.message import Message

from megascope.agent.rank_log import RankLog, RankLogLimits
from megascope.protos import events
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

_BACKFILL_CHUNK = 500
"""Step reports of one back-fill batch."""
MAX_ANSWER_BYTES = 3 << 20
"""The largest message this agent builds: gRPC clients refuse more than 4 MiB by default; a margin for the
node info and rank statuses that ride along."""
_ITEM_OVERHEAD_BYTES = 8
"""A repeated field's item costs its size plus its tag and length prefix."""
WATCH_BATCH_BYTES = 256 << 10
"""A Watch batch's size: well under a client's limit, and what a stream that does not read holds at most."""
_PARTS = ("host_samples", "gpu_samples", "events", "step_reports")
"""The lists of a Telemetry batch, in the order a back-fill sends them."""
_LIVE = (telemetry_pb2.RANK_STATE_STARTING, telemetry_pb2.RANK_STATE_RUNNING, telemetry_pb2.RANK_STATE_HUNG)
_GUARD = worker_pb2.WORKER_ROLE_GUARD


_STOPPED_KEPT = 4096
"""Pids stopped on purpose that are remembered (their exit reports come within seconds)."""


@dataclass
class HistoryLimits:
    seconds: float = 3600.0
    """How far back host and GPU samples (1 Hz) are kept."""
    step_reports: int = 200_000
    step_report_bytes: int = 64 << 20
    events: int = 10_000
    event_bytes: int = 16 << 20
    """Events kept, by count and by bytes (the oldest go first)."""
    pending_step_reports: int = 20_000
    """Per subscriber: step reports waiting to be sent before the oldest are dropped."""
    pending_events: int = 2_000
    pending_samples: int = 3_600
    """Per subscriber: events, and host or GPU samples, waiting to be sent (a stream that does not read)."""


class _Bounded:
    """A deque of messages bounded by count and by bytes: the oldest go first."""

    def __init__(self, count: int, size: int) -> None:
        self.items: deque = deque()  # type: ignore[type-arg]
        self._sizes: deque[int] = deque()
        self._count, self._size, self.bytes = count, size, 0

    def append(self, message: Message) -> None:
        size = message.ByteSize()
        self.items.append(message)
        self._sizes.append(size)
        self.bytes += size
        while len(self.items) > self._count or (self.bytes > self._size and len(self.items) > 1):
            self.items.popleft()
            self.bytes -= self._sizes.popleft()


@dataclass(eq=False)  # identity, not value: subscriptions live in a set
class Subscription:
    limit: int
    step_reports: deque[telemetry_pb2.StepReport] = field(default_factory=deque)
    host_samples: deque[telemetry_pb2.HostSample] = field(default_factory=deque)
    gpu_samples: deque[telemetry_pb2.GpuSample] = field(default_factory=deque)
    events: deque[telemetry_pb2.Event] = field(default_factory=deque)
    dropped: int = 0
    event_limit: int = 2_000
    sample_limit: int = 3_600

    def add_step(self, report: telemetry_pb2.StepReport) -> None:
        self.step_reports.append(report)
        if len(self.step_reports) > self.limit:
            self.step_reports.popleft()
            self.dropped += 1

    def add(self, part: deque, message: Message, limit: int) -> None:  # type: ignore[type-arg]
        """Queue a message of one part; the oldest is dropped (counted) past ``limit``."""
        part.append(message)
        if len(part) > limit:
            part.popleft()
            self.dropped += 1


class RankListener(Protocol):
    """Told of every rank's lifecycle as it happens (the agent's supervisor: crash and hang detection).

    Lifecycle comes from the worker's own messages (hello, step reports, finished, failure, self-check), its
    guard's (hello, progress, finished, exit report) and their streams ending; never from events, which are for people.
    ``rank_attached`` is called once per process of a rank (its own Hello, or its guard's when that comes first).
    """

    def rank_attached(self, hello: worker_pb2.Hello) -> None: ...
    def rank_progressed(self, rank: int, pid: int, output: bool, cpu: bool) -> None:
        """A process-only rank's guard saw new output lines (``output``) or CPU time advance (``cpu``)."""

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
        self._step_history = _Bounded(self.limits.step_reports, self.limits.step_report_bytes)
        self.step_reports: deque[telemetry_pb2.StepReport] = self._step_history.items
        self.host_samples: deque[telemetry_pb2.HostSample] = deque(maxlen=samples)
        self.gpu_samples: deque[telemetry_pb2.GpuSample] = deque(maxlen=samples * 8)
        self._event_history = _Bounded(self.limits.events, self.limits.event_bytes)
        self.events: deque[telemetry_pb2.Event] = self._event_history.items
        self.ranks: dict[int, telemetry_pb2.RankStatus] = {}
        self._finished: set[int] = set()
        self._stopped: dict[int, str] = {}
        """Pids the agent stopped on purpose, and why (the newest _STOPPED_KEPT: a long job restarts many times)."""
        self._subscribers: set[Subscription] = set()
        self.stack_files: dict[int, str] = {}
        """Each rank's stack dump file, from its Hello."""
        self.rank_streams: dict[int, int] = {}
        """Ranks attached themselves (megascope's API or trainer), to the pid of their stream."""
        self.guards: dict[int, int] = {}
        """Ranks whose guard is attached, to the pid of the rank's process it runs."""
        self.rank_log_limits = RankLogLimits()
        self.logs: dict[int, RankLog] = {}
        """Each rank's newest output lines, from its guard (GetRankLog)."""
        self.listener: RankListener | None = None
        self.step_observers: list[Callable[[telemetry_pb2.StepReport], None]] = []
        """Told of every step report kept, after the listener (the node's straggler judge, agent/stragglers.py)."""
        self.archive: Callable[[float, float], Iterable[telemetry_pb2.Telemetry]] | None = None
        """The node's record (agent/record.py): what a back-fill reaching back past memory reads, ``(since, until)``."""

    # --- incoming ------------------------------------------------------------------------------------

    @property
    def history_bytes(self) -> int:
        """Bytes of the step reports and events kept (the parts a client can grow)."""
        return self._step_history.bytes + self._event_history.bytes

    def add_step(self, report: telemetry_pb2.StepReport) -> None:
        self._step_history.append(report)
        status = self._rank(report.rank)
        status.state = telemetry_pb2.RANK_STATE_RUNNING
        status.source = telemetry_pb2.RANK_SOURCE_STEPS
        status.last_step = report.step
        status.last_heartbeat_wall_time = status.last_progress_wall_time = time.time()
        status.collectives_issued = report.collectives_issued
        for sub in self._subscribers:
            sub.add_step(report)
        if self.listener is not None:
            self.listener.rank_stepped(report)
        for observe in self.step_observers:
            observe(report)

    def add_host_sample(self, sample: telemetry_pb2.HostSample) -> None:
        self.host_samples.append(sample)
        for sub in self._subscribers:
            sub.add(sub.host_samples, sample, sub.sample_limit)

    def add_gpu_samples(self, samples: list[telemetry_pb2.GpuSample]) -> None:
        self.gpu_samples.extend(samples)
        for sub in self._subscribers:
            for sample in samples:
                sub.add(sub.gpu_samples, sample, sub.sample_limit * 8)

    def add_event(self, event: telemetry_pb2.Event) -> None:
        if not event.node:
            event.node = self.node_info.node
        if not event.wall_time:
            event.wall_time = time.time()
        self._event_history.append(event)
        for sub in self._subscribers:
            sub.add(sub.events, event, sub.event_limit)

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
        """A rank's stream (or its guard's: ``hello.role``) began."""
        self._log(hello.rank).new_process(hello.pid, hello.restart_count)
        if hello.role == _GUARD:
            self.guards[hello.rank] = hello.pid
            current = self.ranks.get(hello.rank)
            if current is not None and current.pid == hello.pid and current.state in _LIVE:
                return  # the rank itself came first: its guard adds nothing to what is known
        else:
            self.rank_streams[hello.rank] = hello.pid
        status = self._rank(hello.rank)
        if hello.role != _GUARD and status.pid == hello.pid and status.state in _LIVE:
            # Its guard came first, for the same process: from now on the rank's own steps tell its progress.
            status.source = telemetry_pb2.RANK_SOURCE_STEPS
            if not status.HasField("last_step"):
                status.state = telemetry_pb2.RANK_STATE_STARTING  # running, as far as steps go, from its first
            self.stack_files[hello.rank] = hello.stack_file
            if self.listener is not None:
                self.listener.rank_attached(hello)
            return
        status.pid = hello.pid
        status.source = telemetry_pb2.RANK_SOURCE_PROCESS if hello.role == _GUARD else telemetry_pb2.RANK_SOURCE_STEPS
        status.last_progress_wall_time = 0.0
        status.output_lines = 0
        status.cpu_seconds = 0.0
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

    def rank_progress(self, hello: worker_pb2.Hello, progress: worker_pb2.ProcessProgress) -> None:
        """A guard's report of its rank's output and CPU time (``hello``: the guard's)."""
        if self.guards.get(hello.rank) == hello.pid and (progress.lines or progress.lines_dropped):
            # Before the liveness check: the last lines (a traceback) come after the rank has ended.
            self._log(hello.rank).add(list(progress.lines), progress.lines_dropped)
        status = self.ranks.get(hello.rank)
        if status is None or status.state not in _LIVE or self.guards.get(hello.rank) != hello.pid:
            return  # a guard of a process that is gone, or replaced
        now = time.time()
        status.last_heartbeat_wall_time = now
        # Counters only move forward: a value that goes back is ignored, never turned into progress.
        output = progress.output_lines > status.output_lines
        cpu = progress.cpu_seconds > status.cpu_seconds
        status.output_lines = max(status.output_lines, progress.output_lines)
        status.cpu_seconds = max(status.cpu_seconds, progress.cpu_seconds)
        if status.source != telemetry_pb2.RANK_SOURCE_PROCESS:
            return  # the rank reports its own steps: they say more than its output
        if output:
            status.last_progress_wall_time = now
        if (output or cpu) and status.state == telemetry_pb2.RANK_STATE_STARTING:
            status.state = telemetry_pb2.RANK_STATE_RUNNING
        if (output or cpu) and self.listener is not None:
            self.listener.rank_progressed(hello.rank, status.pid, output, cpu)

    def guard_detached(self, hello: worker_pb2.Hello, finished: bool) -> None:
        """A guard's stream ended: after ``finished`` its rank exited with status 0; otherwise its rank ended as its
        exit report said (sent before), or the guard itself was killed."""
        if self.guards.get(hello.rank) == hello.pid:
            del self.guards[hello.rank]
        status = self.ranks.get(hello.rank)
        if status is None or status.pid != hello.pid or status.state not in _LIVE:
            return  # already known: its exit report came, or the rank's own stream said
        if self.rank_streams.get(hello.rank) == hello.pid:
            return  # the rank's own stream is still open: its end tells
        if finished:
            self._finished.add(hello.rank)
        self._detached(hello.rank, status)

    def rank_heartbeat(self, heartbeat: telemetry_pb2.Heartbeat) -> None:
        status = self._rank(heartbeat.rank)
        status.last_heartbeat_wall_time = time.time()
        status.collectives_issued = max(status.collectives_issued, heartbeat.collectives_issued)

    def stopping(self, pid: int, why: str) -> None:
        """The agent is stopping the process ``pid`` on purpose (``why``: "restart requested"): its end is shown as
        stopped, not failed, and is no loss to warn about."""
        self._stopped[pid] = why
        while len(self._stopped) > _STOPPED_KEPT:
            del self._stopped[next(iter(self._stopped))]

    def rank_exited(self, report: worker_pb2.ExitReport) -> None:
        """How a rank's process ended, from its guard (only abnormal ends are reported)."""
        status = self.ranks.get(report.rank)
        if status is not None and status.pid == report.pid:
            why = self._stopped.get(report.pid)
            status.state = telemetry_pb2.RANK_STATE_FAILED if why is None else telemetry_pb2.RANK_STATE_EXITED
            status.exit_reason = report.signal or f"exit code {report.exit_code}"
            if report.cause:
                status.exit_reason += f": {report.cause}"
            if why is not None:
                status.exit_reason = f"stopped: {why}"
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

    def rank_detached(self, rank: int, pid: int | None = None) -> None:
        """A rank's own stream ended (``pid``: its process, when known)."""
        if pid is not None and self.rank_streams.get(rank) == pid:
            del self.rank_streams[rank]
        status = self._rank(rank)
        if pid is not None and status.pid != pid:
            return  # a stream of an older process of the rank, ending late
        if rank not in self._finished and status.state in _LIVE and self.guards.get(rank) == pid:
            # Its guard still watches the process: the guard's exit report (or finished) says how it ends, and until
            # then the rank is supervised as its process (a script whose link to the agent ended, not its life).
            status.source = telemetry_pb2.RANK_SOURCE_PROCESS
            return
        self._detached(rank, status)

    def _detached(self, rank: int, status: telemetry_pb2.RankStatus) -> None:
        finished = rank in self._finished
        if self.listener is not None:
            self.listener.rank_detached(rank, status.pid, finished)
        if finished:
            status.state = telemetry_pb2.RANK_STATE_EXITED
            return
        why = self._stopped.get(status.pid)
        if why is not None:
            status.state = telemetry_pb2.RANK_STATE_EXITED
            status.exit_reason = f"stopped: {why}"
            return
        status.state = telemetry_pb2.RANK_STATE_FAILED
        last = f"step {status.last_step}" if status.HasField("last_step") else "before its first step"
        self.event(
            f"rank {rank} (pid {status.pid}) went away without finishing, {last}",
            kind=events.RANK_LOST,
            severity=events.WARNING,
            rank=rank,
        )

    def _log(self, rank: int) -> RankLog:
        if rank not in self.logs:
            self.logs[rank] = RankLog(rank, self.rank_log_limits)
        return self.logs[rank]

    def rank_log(self, rank: int, max_lines: int) -> agent_pb2.GetRankLogResponse | None:
        """The GetRankLog answer: the rank's newest lines (at most ``max_lines``, under the answer's size limit);
        None when the rank is not on this node."""
        if rank not in self.ranks:
            return None
        return self._log(rank).answer(max_lines, MAX_ANSWER_BYTES)

    def _rank(self, rank: int) -> telemetry_pb2.RankStatus:
        if rank not in self.ranks:
            self.ranks[rank] = telemetry_pb2.RankStatus(rank=rank, state=telemetry_pb2.RANK_STATE_STARTING)
            self.node_info.ranks[:] = sorted(self.ranks)
        return self.ranks[rank]

    # --- outgoing ------------------------------------------------------------------------------------

    def subscribe(self, backfill_seconds: float) -> tuple[Subscription, Iterator[telemetry_pb2.Telemetry]]:
        """A new subscription and the back-fill batches it should send first.

        Both are taken in one synchronous step, so nothing arriving afterwards is missed or sent twice. The
        back-fill's messages are chosen now, but its batches are built as the stream sends them: a Watch stream
        that does not read holds one batch, not a copy of the history.
        """
        since = time.time() - backfill_seconds if backfill_seconds > 0 else 0.0
        backfill = self._backfill(since)
        sub = Subscription(
            limit=self.limits.pending_step_reports,
            event_limit=self.limits.pending_events,
            sample_limit=self.limits.pending_samples,
        )
        self._subscribers.add(sub)
        return sub, backfill

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscribers.discard(sub)

    def take(self, sub: Subscription) -> list[telemetry_pb2.Telemetry]:
        """Everything the subscription accumulated since the last take, as live batches (one, unless it is more
        than one message may hold)."""
        parts = {name: list(getattr(sub, name)) for name in _PARTS}
        for name in _PARTS:
            getattr(sub, name).clear()
        return list(self._batches(parts, backfill=False))

    def _backfill(self, since: float) -> Iterator[telemetry_pb2.Telemetry]:
        parts = {name: [m for m in getattr(self, name) if m.wall_time >= since] for name in _PARTS}
        # Host, GPU and events first; step reports, the bulk, in chunks.
        batches = self._batches(parts, backfill=True, steps_per_batch=_BACKFILL_CHUNK)
        if self.archive is None:
            return batches
        # Memory starts at the agent's (re)start or where its bounds cut: older history comes from the record, as far
        # back as asked (all: as far as memory would keep).
        held = [getattr(self, name)[0].wall_time for name in _PARTS if getattr(self, name)]
        oldest = min(held, default=time.time())
        start = since if since > 0 else time.time() - self.limits.seconds
        if start >= oldest:
            return batches
        return itertools.chain(self._archived(self.archive(start, oldest)), batches)

    def _archived(self, batches: Iterable[telemetry_pb2.Telemetry]) -> Iterator[telemetry_pb2.Telemetry]:
        for batch in batches:
            batch.node_info.CopyFrom(self.node_info)
            yield batch

    def _batches(
        self,
        parts: dict[str, list[Message]],
        backfill: bool,
        steps_per_batch: int = 0,
    ) -> Iterator[telemetry_pb2.Telemetry]:
        """``parts`` in batches of at most :data:`WATCH_BATCH_BYTES` (and ``steps_per_batch`` step reports); at
        least one batch, even an empty one."""
        budget = WATCH_BATCH_BYTES - self._telemetry().ByteSize()
        batch: dict[str, list[Message]] = {name: [] for name in _PARTS}
        size = 0
        sent = False
        for name in _PARTS:
            for message in parts[name]:
                cost = message.ByteSize() + _ITEM_OVERHEAD_BYTES
                full = size + cost > budget or (name == "step_reports" and len(batch[name]) == steps_per_batch)
                if full and size:
                    yield self._telemetry(backfill=backfill, **batch)
                    sent = True
                    batch, size = {part: [] for part in _PARTS}, 0
                batch[name].append(message)
                size += cost
        if size or not sent:
            yield self._telemetry(backfill=backfill, **batch)

    def _telemetry(self, backfill: bool = False, **lists: list) -> telemetry_pb2.Telemetry:  # type: ignore[type-arg]
        return telemetry_pb2.Telemetry(
            **lists, backfill=backfill, node_info=self.node_info, rank_statuses=list(self.ranks.values())
        )

    def snapshot(self, recent_events: int = 100) -> agent_pb2.GetSnapshotResponse:
        """The node now: the latest report of each rank, the latest samples, the recent events (as many of them
        as fit the answer's budget, the newest; ``events_left_out`` counts the others)."""
        latest: dict[int, telemetry_pb2.StepReport] = {}
        for report in reversed(self.step_reports):
            if report.rank not in latest:
                latest[report.rank] = report
            if len(latest) == len(self.ranks):
                break
        response = agent_pb2.GetSnapshotResponse(
            node_info=self.node_info,
            step_reports=[latest[rank] for rank in sorted(latest)],
            rank_statuses=list(self.ranks.values()),
        )
        if self.host_samples:
            response.host_sample.CopyFrom(self.host_samples[-1])
        if self.gpu_samples:
            newest = self.gpu_samples[-1].wall_time
            response.gpu_samples.extend(s for s in self.gpu_samples if s.wall_time == newest)
        recent = list(self.events)[-recent_events:] if recent_events > 0 else []
        kept = newest_that_fit(recent, MAX_ANSWER_BYTES - response.ByteSize())
        response.events.extend(kept)
        response.events_left_out = len(recent) - len(kept)
        return response

    def events_since(self, since: float, limit: int, kinds: set[str]) -> list[telemetry_pb2.Event]:
        # Strictly after (as the wire says), so a client that pages from the last event it got gets none twice.
        selected = [e for e in self.events if e.wall_time > since and (not kinds or e.kind in kinds)]
        return selected[-limit:] if limit > 0 else selected

    def get_events(self, since: float, limit: int, kinds: set[str]) -> agent_pb2.GetEventsResponse:
        """The GetEvents answer: as many matching events as fit in one message, and how many were left out. Without
        ``since``, the newest (the recent past); with it, the oldest after it, so a client pages forward by asking
        again from the last event it got."""
        selected = self.events_since(since, limit, kinds)
        fit = newest_that_fit if since <= 0 else oldest_that_fit
        kept = fit(selected, MAX_ANSWER_BYTES)
        return agent_pb2.GetEventsResponse(events=kept, events_left_out=len(selected) - len(kept))


def oldest_that_fit(messages: list[Message], budget: int) -> list:  # type: ignore[type-arg]
    """The oldest of ``messages`` whose sizes add up to at most ``budget`` bytes."""
    size, end = 0, 0
    while end < len(messages):
        size += messages[end].ByteSize() + _ITEM_OVERHEAD_BYTES
        if size > budget:
            break
        end += 1
    return messages[:end]


def newest_that_fit(messages: list[Message], budget: int) -> list:  # type: ignore[type-arg]
    """The newest of ``messages`` whose sizes add up to at most ``budget`` bytes, oldest first."""
    size, start = 0, len(messages)
    while start > 0:
        size += messages[start - 1].ByteSize() + _ITEM_OVERHEAD_BYTES
        if size > budget:
            break
        start -= 1
    return messages[start:]
