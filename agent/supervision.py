"""Crash and hang detection for one node's ranks, the diagnosis, and the restart through torch elastic.

torch elastic (torchrun, a child of the agent) restarts the ranks when one of them exits; the ranks resume
from the newest committed checkpoint. What it cannot do, this does:

- crash: a rank's stream ends without "finished" and its guard (engine/runtime/rank_guard.py) reports how it ended
  (signal or exit code, the last lines of its log). The first abnormal end of an incident is the crash; the
  ranks that die after it because a peer vanished, or because torch elastic stopped them, are collateral.
  A node whose ranks only died of collateral causes says so (``peer_failed``): the crash is another node's.
- hang: no rank of the node completes a step for the hang timeout. The stacks of every rank are collected
  (agent/stacks.py) and :func:`~megascope.agent.hang_rules.diagnose` names the culprit. The node that has the
  culprit stops its ranks (SIGKILL), so torch elastic restarts the job; the other nodes' ranks then fail on the
  broken connections. A node that finds no culprit waits one more timeout for that, then stops its own ranks.
- restart: the first step completed after an incident closes it, with the time to repair and the steps lost.

Self-check (engine/runtime/selfcheck.py): when this node's ranks report it slow and the agent runs with
``--evict-slow-nodes``, the agent is told to take the node out of the job (``evict``).

Events (the contract the demo summary and the dashboard read): ``crash`` (rank: the rank that died), ``hang``
(rank: the culprit; absent when none was found), ``restart``, ``peer_failed``, ``stalled``, ``job_failed``.
Only the node that runs rank 0 reports ``restart``: one event per restart of the job, not one per node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

from megascope.agent import stacks
from megascope.agent.hang_rules import Diagnosis, RankProgress, diagnose
from megascope.agent.state import NodeState
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

MIN_HANG_TIMEOUT_SECONDS = 30.0
HANG_TIMEOUT_STEPS = 5.0
"""Without --hang-timeout: the larger of 30 s and this many median step times."""
FIRST_STEP_ALLOWANCE = 3.0
"""Before an attempt's first step (rendezvous, loading, resuming), the timeout is this many times longer."""
CRASH_REPORT_WAIT_SECONDS = 1.0
"""After a rank vanishes, how long to wait for its guard's exit report before reporting without one."""
_CHECK_SECONDS = 0.2
_COLLATERAL_SIGNALS = {"SIGTERM", "SIGINT", "SIGHUP"}
_PEER_FAILURE_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "connectFullMesh",
    "Broken pipe",
    "remote worker crashing",
    "Socket Timeout",
)
_LOG_TAIL_EVENT_LINES = 8
_ERROR = telemetry_pb2.Event.SEVERITY_ERROR
_WARNING = telemetry_pb2.Event.SEVERITY_WARNING


@dataclass
class _Failure:
    rank: int
    pid: int
    seen: float
    """Wall time the agent learned of it (the stream ended or the report came)."""
    report: worker_pb2.ExitReport | None = None

    @property
    def died(self) -> float:
        return self.report.wall_time if self.report is not None else self.seen

    @property
    def collateral(self) -> bool:
        """Died because the job was going down anyway: stopped by torch elastic, or a peer vanished."""
        if self.report is None:
            return False
        if self.report.signal in _COLLATERAL_SIGNALS:
            return True
        tail = "\n".join(self.report.log_tail)
        return any(marker in tail for marker in _PEER_FAILURE_MARKERS)

    def how(self) -> str:
        if self.report is None:
            return "ended without a word (its guard did not report)"
        if self.report.signal:
            return f"killed by {self.report.signal}"
        return f"exited with code {self.report.exit_code}"


@dataclass
class _Incident:
    kind: str
    """"crash", "hang" or "manual"."""
    started: float
    """Wall time of the fault: the death, or the last completed step before a hang."""
    step: int
    """The newest step completed before the fault."""
    failures: list[_Failure] = field(default_factory=list)
    reported: bool = False
    detected: float = 0.0
    acted: bool = False
    """The agent stopped its ranks for it."""


class Supervisor:
    """Watches the node's ranks (a :class:`~megascope.agent.state.RankListener` of the node state)."""

    def __init__(
        self,
        state: NodeState,
        hang_timeout: float | None = None,
        evict: Callable[[str], None] | None = None,
    ) -> None:
        self.state = state
        self.hang_timeout = hang_timeout
        self._evict = evict
        """Called with the reason when this node's self-check finds it slow (``--evict-slow-nodes``)."""
        self.last_diagnosis: agent_pb2.DumpStacksResponse | None = None
        self.restarts = 0
        self._incident: _Incident | None = None
        self._last_progress = time.time()
        self._progress_step = 0
        self._stepped_since_attach = False
        self._step_seconds: deque[float] = deque(maxlen=50)
        self._expected_exits: set[int] = set()
        """Pids the agent itself stopped: their ends are not crashes."""
        self._attached_at: dict[int, float] = {}
        self._last_report_step = 0
        self._task: asyncio.Task[None] | None = None
        state.listener = self

    # --- RankListener ----------------------------------------------------------------------------------

    def rank_attached(self, hello: worker_pb2.Hello) -> None:
        self._attached_at[hello.rank] = time.time()
        self._last_progress = time.time()
        self._stepped_since_attach = False

    def rank_stepped(self, report: telemetry_pb2.StepReport) -> None:
        now = time.time()
        if report.step > self._progress_step or self._incident is not None:
            self._last_progress = now
        self._progress_step = max(self._progress_step, report.step) if self._incident is None else report.step
        self._stepped_since_attach = True
        self._step_seconds.append(report.step_seconds)
        incident = self._incident
        if incident is not None and self._attached_at.get(report.rank, 0.0) > incident.started:
            self._close(incident, report)

    def rank_detached(self, rank: int, pid: int, finished: bool) -> None:
        if not finished:
            self._failure(rank, pid)

    def rank_exited(self, report: worker_pb2.ExitReport) -> None:
        self._failure(report.rank, report.pid).report = report

    def event_added(self, event: telemetry_pb2.Event) -> None:
        if event.kind == "rank_failed" and event.HasField("rank"):
            self._rank_failed(event)
        elif event.kind == "self_check" and self._is_slow_here(event):
            assert self._evict is not None
            self._evict(event.text)

    def _is_slow_here(self, check: telemetry_pb2.Event) -> bool:
        """A self-check of this node that found it slow, with eviction asked for."""
        here = check.node == self.state.node_info.node
        return self._evict is not None and here and check.attributes.get("verdict") == "slow"

    def _rank_failed(self, event: telemetry_pb2.Event) -> None:
        """A rank's own last words (an exception it raised): as good as its guard's report, and sooner."""
        status = self.state.ranks.get(event.rank)
        if status is None or not status.pid:
            return
        failure = self._failure(event.rank, status.pid)
        if failure.report is None:
            failure.report = worker_pb2.ExitReport(
                rank=event.rank,
                pid=status.pid,
                exit_code=1,
                wall_time=event.wall_time,
                log_tail=event.attributes.get("traceback", event.text).splitlines(),
            )

    def _failure(self, rank: int, pid: int) -> _Failure:
        if pid in self._expected_exits:
            return _Failure(rank, pid, time.time())  # stopped by the agent: not a fault of its own
        incident = self._incident
        if incident is None:
            incident = self._incident = _Incident("crash", time.time(), self._progress_step)
        for failure in incident.failures:
            if failure.pid == pid:
                return failure
        failure = _Failure(rank, pid, time.time())
        incident.failures.append(failure)
        return failure

    # --- the loop ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_CHECK_SECONDS)
            incident = self._incident
            if incident is not None and incident.kind == "crash" and not incident.reported:
                self._maybe_report_crash(incident)
            elif incident is None and self._running_ranks():
                limit = self.current_hang_timeout()
                if not self._stepped_since_attach:
                    limit *= FIRST_STEP_ALLOWANCE
                if time.time() - self._last_progress > limit:
                    await self._handle_hang()
            elif incident is not None and incident.kind == "hang" and incident.reported and not incident.acted:
                # No culprit here: another node's should stop its ranks; if nothing happened, stop ours.
                untouched = not incident.failures and all(
                    self._attached_at.get(s.rank, 0.0) < incident.started for s in self._running_ranks()
                )
                if untouched and time.time() - incident.detected > self.current_hang_timeout():
                    self._emit_hang_without_culprit(incident)

    def current_hang_timeout(self) -> float:
        if self.hang_timeout:
            return self.hang_timeout
        median = statistics.median(self._step_seconds) if self._step_seconds else 0.0
        return max(MIN_HANG_TIMEOUT_SECONDS, HANG_TIMEOUT_STEPS * median)

    def live_ranks(self) -> list[telemetry_pb2.RankStatus]:
        """Ranks that are starting, running or hung (not exited or failed)."""
        live = (telemetry_pb2.RANK_STATE_RUNNING, telemetry_pb2.RANK_STATE_STARTING, telemetry_pb2.RANK_STATE_HUNG)
        return [s for s in self.state.ranks.values() if s.state in live]

    def _running_ranks(self) -> list[telemetry_pb2.RankStatus]:
        live = (telemetry_pb2.RANK_STATE_RUNNING, telemetry_pb2.RANK_STATE_STARTING)
        return [s for s in self.state.ranks.values() if s.state in live]

    # --- crash ------------------------------------------------------------------------------------------

    def _maybe_report_crash(self, incident: _Incident) -> None:
        now = time.time()
        culprits = sorted(
            (f for f in incident.failures if f.report is not None and not f.collateral), key=lambda f: f.died
        )
        waited = now - min(f.seen for f in incident.failures) if incident.failures else 0.0
        if not culprits and waited < CRASH_REPORT_WAIT_SECONDS:
            return
        incident.reported = True
        incident.detected = now
        if not culprits:
            unreported = sorted((f for f in incident.failures if f.report is None), key=lambda f: f.seen)
            if not unreported:
                collateral = ", ".join(f"rank {f.rank} ({f.how()})" for f in incident.failures)
                self.state.event(
                    "peer_failed",
                    f"ranks stopped because a peer failed or torch elastic stopped them: {collateral}",
                    _WARNING,
                )
                return
            culprits = unreported
        culprit = culprits[0]
        incident.started = culprit.died
        others = [f for f in incident.failures if f is not culprit]
        tail = list(culprit.report.log_tail)[-_LOG_TAIL_EVENT_LINES:] if culprit.report is not None else []
        text = (
            f"rank {culprit.rank} (pid {culprit.pid}) {culprit.how()} after step {incident.step}; "
            f"detected in {now - culprit.died:.2f}s"
        )
        if others:
            text += "; then " + ", ".join(f"rank {f.rank} {f.how()}" for f in others)
        self.state.event(
            "crash",
            text,
            _ERROR,
            rank=culprit.rank,
            step=incident.step,
            pid=str(culprit.pid),
            signal=culprit.report.signal if culprit.report is not None else "",
            exit_code=str(culprit.report.exit_code) if culprit.report is not None else "",
            detect_seconds=f"{now - culprit.died:.3f}",
            fault_time=f"{culprit.died:.3f}",
            last_step=str(incident.step),
            log_tail="\n".join(tail),
        )

    # --- hang -------------------------------------------------------------------------------------------

    async def collect_stacks(self, timeout: float = stacks.DEFAULT_TIMEOUT_SECONDS) -> agent_pb2.DumpStacksResponse:
        """Every local rank's stacks and progress, and the diagnosis of them; also kept as the last diagnosis."""
        ranks = self.live_ranks()
        targets = [stacks.RankTarget(s.rank, s.pid, self.state.stack_files.get(s.rank, "")) for s in ranks]
        dumps = {d.rank: d for d in await stacks.collect(targets, timeout)}
        progress = [
            RankProgress(
                rank=s.rank,
                last_step=s.last_step if s.HasField("last_step") else 0,
                collectives_issued=s.collectives_issued,
                stacks=dumps[s.rank].text,
                note=dumps[s.rank].method,
            )
            for s in ranks
        ]
        diagnosis = diagnose(progress)
        response = _response(progress, dumps, diagnosis)
        self.last_diagnosis = response
        return response

    async def _handle_hang(self) -> None:
        started = self._last_progress
        incident = self._incident = _Incident("hang", started, self._progress_step)
        response = await self.collect_stacks()
        now = time.time()
        incident.detected = now
        incident.reported = True
        for status in self._running_ranks():
            status.state = telemetry_pb2.RANK_STATE_HUNG
        answered = sum(1 for r in response.ranks if r.answered)
        if response.culprit < 0:
            self.state.event(
                "stalled",
                f"no step completed for {now - started:.1f}s after step {incident.step}; stacks of {answered}/"
                f"{len(response.ranks)} ranks collected; {response.reason}: the culprit may be on another node",
                _WARNING,
            )
            return
        culprit = next(r for r in response.ranks if r.rank == response.culprit)
        how = f" (its stacks: {culprit.method})" if culprit.method != "signal" else ""
        self.state.event(
            "hang",
            f"rank {response.culprit} hangs{how}: {response.reason}; no step for {now - started:.1f}s after step "
            f"{incident.step}; stacks of {answered}/{len(response.ranks)} ranks collected; restarting",
            _ERROR,
            rank=response.culprit,
            step=incident.step,
            detect_seconds=f"{now - started:.3f}",
            fault_time=f"{started:.3f}",
            last_step=str(incident.step),
            reason=response.reason,
        )
        incident.acted = True
        self.stop_ranks()

    def _emit_hang_without_culprit(self, incident: _Incident) -> None:
        incident.acted = True
        self.state.event(
            "hang",
            f"no step for {time.time() - incident.started:.1f}s and no culprit found; stopping this node's ranks "
            "so the job restarts",
            _ERROR,
            detect_seconds=f"{time.time() - incident.started:.3f}",
            fault_time=f"{incident.started:.3f}",
            last_step=str(incident.step),
        )
        self.stop_ranks()

    # --- restart ----------------------------------------------------------------------------------------

    def stop_ranks(self) -> int:
        """SIGKILL every live rank of the node (torch elastic restarts them); how many were signalled.

        Only processes this agent started (its descendants) are signalled: a pid from the wire is never trusted.
        """
        stopped = 0
        for status in self.live_ranks():
            if status.pid and _is_descendant(status.pid):
                self._expected_exits.add(status.pid)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(status.pid, signal.SIGKILL)
                    stopped += 1
        return stopped

    def request_restart(self, reason: str) -> int:
        """A restart asked for by a user: stop the ranks; the restart event follows the first step after it."""
        if self._incident is None:
            self._incident = _Incident("manual", time.time(), self._progress_step, reported=True, acted=True)
            self._incident.detected = time.time()
        self.state.event("restart_requested", f"restart requested: {reason}", _WARNING)
        return self.stop_ranks()

    def _close(self, incident: _Incident, report: telemetry_pb2.StepReport) -> None:
        self._incident = None
        self.restarts += 1
        now = time.time()
        resumed = report.step - 1
        lost = max(0, incident.step - resumed)
        if report.rank != 0 and 0 not in self.state.ranks:
            return  # the node with rank 0 reports the job's restart
        self.state.event(
            "restart",
            f"job restarted after the {incident.kind}: resumed from step {resumed}, first step done "
            f"{now - incident.started:.1f}s after the fault, {lost} steps lost",
            _WARNING,
            rank=report.rank,
            step=resumed,
            cause=incident.kind,
            mttr_seconds=f"{now - incident.started:.3f}",
            steps_lost=str(lost),
            resumed_step=str(resumed),
            restart_count=str(report.restart_count),
        )


def _is_descendant(pid: int) -> bool:
    try:
        return any(parent.pid == os.getpid() for parent in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def _response(
    progress: list[RankProgress], dumps: dict[int, stacks.RankStackDump], diagnosis: Diagnosis
) -> agent_pb2.DumpStacksResponse:
    return agent_pb2.DumpStacksResponse(
        ranks=[
            agent_pb2.RankStacks(
                rank=p.rank,
                pid=dumps[p.rank].pid,
                answered=dumps[p.rank].text is not None,
                method=dumps[p.rank].method,
                text=dumps[p.rank].text or "",
                last_step=p.last_step,
                collectives_issued=p.collectives_issued,
                signature=diagnosis.signatures.get(p.rank, ""),
            )
            for p in progress
        ],
        culprit=-1 if diagnosis.culprit is None else diagnosis.culprit,
        reason=diagnosis.reason,
    )
