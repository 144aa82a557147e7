"""Supervision of one node's ranks: drives the incident logic (agent/incidents.py) with real processes.

torch elastic (torchrun, a child of the agent) restarts the ranks when one of them exits; the ranks resume
from the newest committed checkpoint. What it cannot do, this does, as the :class:`IncidentTracker` decides:

- crash: a rank's stream ends without a ``finished`` message, and its guard (engine/runtime/rank_guard.py)
  reports how it ended, or the rank sent its own ``failure`` report first. The tracker names the culprit and
  tells collateral deaths apart (``peer_failed``).
- hang: no rank of the node completes a step for the hang timeout. This collects every rank's stacks
  (agent/stacks.py), :func:`~megascope.agent.hang_rules.diagnose` names the culprit, and the node with the
  culprit stops its ranks (SIGKILL), so torch elastic restarts the job.
- restart: the first step completed after an incident closes it (``restart``, with the time to repair).

A script that never calls megascope is supervised through its ranks' guards (engine/runtime/rank_guard.py): each
reports its rank's output lines and CPU time. A new line is progress. A rank that writes nothing for a third of the
hang timeout while its CPU time advances is looked at with py-spy (:func:`~megascope.agent.stacks.sample`, at most
every sixth of the timeout, only then: py-spy is not free): a stack that changed is progress, the same stack is a
rank spinning in one place (an NCCL wait at 100% CPU), not progress. A sleeping or blocked rank is not looked at.

Self-check (engine/runtime/selfcheck.py): when a rank's ``self_check`` message finds this node slow and the agent
runs with ``--evict-slow-nodes``, the agent is told to take the node out of the job (``evict``).

Everything here runs on the agent's asyncio loop; the decisions, and the time they are made at, are the
tracker's (its clock is injected, so they are unit-tested without processes).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from megascope.agent import stacks
from megascope.agent.hang_rules import Diagnosis, RankProgress, diagnose
from megascope.agent.incidents import Action, Clock, HangFindings, IncidentKind, IncidentTracker, Verdict
from megascope.agent.processes import is_descendant, kill_tree, worker_of
from megascope.agent.state import NodeState
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

_CHECK_SECONDS = 0.2
QUIET_FRACTION = 1 / 3
"""A process-only rank silent (no output line) for this share of the hang timeout has its stack sampled..."""
SAMPLE_FRACTION = 1 / 6
"""...at most once per this share of the timeout (and never more than once a second)."""
_SAMPLE_TIMEOUT_SECONDS = 3.0
_LIVE = (telemetry_pb2.RANK_STATE_RUNNING, telemetry_pb2.RANK_STATE_STARTING, telemetry_pb2.RANK_STATE_HUNG)
_RUNNING = (telemetry_pb2.RANK_STATE_RUNNING, telemetry_pb2.RANK_STATE_STARTING)
_SLOW = telemetry_pb2.SelfCheckDetail.VERDICT_SLOW


class Supervisor:
    """Watches the node's ranks (the :class:`~megascope.agent.state.RankListener` of the node state)."""

    def __init__(
        self,
        state: NodeState,
        hang_timeout: float | None = None,
        evict: Callable[[str], None] | None = None,
        clock: Clock = time.time,
        launcher: Callable[[], int | None] | None = None,
    ) -> None:
        self.state = state
        self._launcher = launcher
        """The pid of the torchrun running the ranks in place (``--recovery inplace``); None: they restart as a job."""
        self.incidents = IncidentTracker(clock, hang_timeout, in_place=launcher is not None)
        self._evict = evict
        """Called with the reason when this node's self-check finds it slow (``--evict-slow-nodes``)."""
        self._clock = clock
        self._task: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None
        self.on_stacks: Callable[[agent_pb2.DumpStacksResponse], None] | None = None
        """Told of every stack collection (the recorder keeps them for replays)."""
        self._quiet: dict[int, _Quiet] = {}
        """Process-only ranks, by rank: what their guards said and what their stacks looked like."""
        state.listener = self

    @property
    def restarts(self) -> int:
        """Restarts of the job this node has seen (incidents closed)."""
        return self.incidents.restarts

    def current_hang_timeout(self) -> float:
        return self.incidents.current_hang_timeout()

    # --- RankListener ----------------------------------------------------------------------------------

    def rank_attached(self, hello: worker_pb2.Hello) -> None:
        guard = hello.role == worker_pb2.WORKER_ROLE_GUARD
        self.incidents.rank_attached(hello.rank, hello.pid, reports_steps=not guard)
        if guard:
            self._quiet[hello.rank] = _Quiet(hello.pid, self._clock())
        else:
            self._quiet.pop(hello.rank, None)

    def rank_progressed(self, rank: int, pid: int, output: bool, cpu: bool) -> None:
        watch = self._quiet.get(rank)
        if watch is None or watch.pid != pid:
            return
        if output:
            watch.last_progress = self._clock()
        for verdict in self.incidents.rank_progressed(rank, pid, busy_only=not output):
            self._record(verdict)

    def rank_stepped(self, report: telemetry_pb2.StepReport) -> None:
        for verdict in self.incidents.rank_stepped(report.rank, report.step, report.step_seconds):
            self._record(verdict)

    def rank_detached(self, rank: int, pid: int, finished: bool) -> None:
        if finished:
            self.incidents.rank_finished(rank)
        else:
            self.incidents.rank_ended(rank, pid)

    def rank_exited(self, report: worker_pb2.ExitReport) -> None:
        self.incidents.exit_reported(report, from_guard=True)

    def rank_failed(self, report: worker_pb2.ExitReport) -> None:
        # The rank's own last words (an exception it caught): as good as its guard's report, and sooner.
        self.incidents.exit_reported(report, from_guard=False)

    def self_checked(self, result: worker_pb2.SelfCheckResult) -> None:
        if self._evict is None or result.detail.verdict != _SLOW:
            return
        measures = ", ".join(result.detail.slow_measures) or "its figures"
        self._evict(f"its self-check found it slow ({measures} far below the other nodes' median)")

    # --- the loop ---------------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def stop(self) -> None:
        for task in (self._task, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(_CHECK_SECONDS)
            if self._quiet and (self._sampler is None or self._sampler.done()):
                # Apart from the checks: py-spy takes a moment, and the hang clock must not wait for it.
                self._sampler = asyncio.ensure_future(self._sample_quiet_ranks())
            for verdict in self.incidents.tick():
                if verdict.action is Action.COLLECT_STACKS:
                    await self._diagnose_hang()
                else:
                    self._record(verdict)

    def _record(self, verdict: Verdict) -> None:
        """Record the verdict's event and take its action (any but COLLECT_STACKS, which needs the loop)."""
        if verdict.event is not None:
            self.state.add_event(verdict.event)
        if verdict.action is Action.STOP_RANKS:
            self.stop_ranks("for the hang" if verdict.incident.kind is IncidentKind.HANG else "by the agent")
        elif verdict.action is Action.STOP_CULPRIT and verdict.rank is not None:
            self.stop_rank(verdict.rank, "for the hang")

    async def _diagnose_hang(self) -> None:
        response = await self.collect_stacks()
        for status in self.state.ranks.values():
            if status.state in _RUNNING:
                status.state = telemetry_pb2.RANK_STATE_HUNG
        culprit = next((r for r in response.ranks if r.rank == response.culprit), None)
        findings = HangFindings(
            culprit=None if culprit is None else culprit.rank,
            reason=response.reason,
            how="" if culprit is None or culprit.method == "signal" else culprit.method,
            ranks_answered=sum(1 for r in response.ranks if r.answered),
            ranks_total=len(response.ranks),
        )
        verdict = self.incidents.hang_diagnosed(findings)
        if verdict is not None:
            self._record(verdict)

    async def _sample_quiet_ranks(self) -> None:
        """Look at the stack of each process-only rank that is quiet but busy; a changed stack is progress."""
        timeout = self.current_hang_timeout()
        for rank, watch in list(self._quiet.items()):
            status = self.state.ranks.get(rank)
            now = self._clock()
            if (
                status is None
                or status.pid != watch.pid
                or status.state not in _RUNNING
                or status.source != telemetry_pb2.RANK_SOURCE_PROCESS
                or now - watch.last_progress < timeout * QUIET_FRACTION
                or now - watch.sampled < max(1.0, timeout * SAMPLE_FRACTION)
                or status.cpu_seconds <= watch.cpu_seconds  # asleep or blocked: nothing moves, nothing to look at
            ):
                continue
            watch.sampled, watch.cpu_seconds = now, status.cpu_seconds
            where = await stacks.sample(watch.pid, _SAMPLE_TIMEOUT_SECONDS)
            if where is None:
                continue
            moved = watch.stack is not None and where != watch.stack
            watch.stack = where
            if moved and self._quiet.get(rank) is watch:
                watch.last_progress = self._clock()
                for verdict in self.incidents.rank_progressed(rank, watch.pid):
                    self._record(verdict)

    def live_ranks(self) -> list[telemetry_pb2.RankStatus]:
        """Ranks that are starting, running or hung (not exited or failed)."""
        return [s for s in self.state.ranks.values() if s.state in _LIVE]

    # --- stacks -----------------------------------------------------------------------------------------

    async def collect_stacks(self, timeout: float = stacks.DEFAULT_TIMEOUT_SECONDS) -> agent_pb2.DumpStacksResponse:
        """Every local rank's stacks and progress, and the diagnosis of them."""
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
        response = _response(progress, dumps, diagnose(progress))
        if self.on_stacks is not None:
            self.on_stacks(response)
        return response

    # --- stopping the ranks -----------------------------------------------------------------------------

    def stop_ranks(self, why: str) -> int:
        """SIGKILL every live rank of the node (torch elastic restarts them); how many were signalled. ``why`` is
        shown with each rank stopped ("restart requested"): a rank the agent stopped on purpose did not fail.

        Only processes this agent started (its descendants) are signalled: a pid from the wire is never trusted.
        """
        stopped = 0
        launcher = self._launcher() if self._launcher is not None else None
        for status in self.live_ranks():
            if is_descendant(status.pid):
                self.incidents.expect_exit(status.pid)
                self.state.stopping(status.pid, why)
                # In place, a rank's guard would replace the rank: the whole job restarts only when the guards go
                # (the ranks die with them), so torch elastic sees its workers fail and restarts them all.
                target = (worker_of(status.pid, launcher) if launcher else None) or status.pid
                # Its descendants too (a rank run by a shell, --no-python); each checked again at the moment of
                # signalling: a process may have ended and its pid been reused.
                stopped += kill_tree(target) > 0
        return stopped

    def stop_rank(self, rank: int, why: str) -> bool:
        """SIGKILL one rank's process (a hang's culprit, with in-place recovery: its guard replaces it and the
        others re-form the group); whether it was signalled. Only a descendant of this agent, as for stop_ranks."""
        status = self.state.ranks.get(rank)
        if status is None or status.state not in _LIVE or not is_descendant(status.pid):
            return False
        self.incidents.expect_exit(status.pid)
        self.state.stopping(status.pid, why)
        return kill_tree(status.pid) > 0

    def request_restart(self, reason: str, from_step: int | None = None) -> int:
        """A restart asked for by a user: stop the ranks; the restart event follows the first step after it."""
        verdict = self.incidents.restart_requested(reason, from_step)
        if verdict.event is not None:
            self.state.add_event(verdict.event)
        return self.stop_ranks("restart requested")


@dataclass
class _Quiet:
    """A process-only rank: when it last showed progress, and its stack when last sampled."""

    pid: int
    last_progress: float
    """When it attached, wrote a line, or its stack last changed."""
    sampled: float = 0.0
    cpu_seconds: float = 0.0
    """Its CPU time at the last sample: a rank whose CPU time has not moved since is not sampled again."""
    stack: str | None = None


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
