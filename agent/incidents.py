"""Supervision's incident logic: what happened to this node's ranks, and what to do about it. Pure: no processes,
no gRPC, no asyncio, no clock of its own.

:class:`IncidentTracker` is fed what the agent learns of its ranks (attached, stepped, ended, an exit report, a
finish) and the passing of time (:meth:`~IncidentTracker.tick`, with an injected clock), and answers with
:class:`Verdict` objects: the event to record (typed, built with :func:`megascope.protos.events.make_event`) and
the :class:`Action` the caller must take. agent/supervision.py drives it with real processes and a real clock;
tests/unit/test_incidents.py drives it with scripted ranks and a fake clock.

An incident has a kind (:class:`IncidentKind`) and goes through the states of :class:`IncidentState`, never back:

- crash: DETECTED when a rank's end is learned (its stream ended without finishing, or a failure report came);
  REPORTED once the culprit is named (the first abnormal end that is not collateral, i.e. not a SIGTERM from
  torch elastic or a peer's broken connection), or ``peer_failed`` when every death was collateral. torch
  elastic restarts the ranks on its own, so the agent takes no action: no ACTED.
- hang: DETECTED when no rank completes a step for the hang timeout (the caller collects the stacks); REPORTED
  with the diagnosis: a culprit here (the node stops its ranks: ACTED at once) or none here (``stalled``: the
  culprit is probably on another node, whose agent stops its ranks). A node that found no culprit and sees
  nothing happen for one more timeout stops its own ranks (``hang`` without a culprit: ACTED).
- requested: a restart asked for through the Restart RPC; ACTED at once (the ranks are stopped).

With in-place recovery (``in_place``: engine/recovery.py) a hang's culprit is stopped alone (STOP_CULPRIT): its
guard replaces it and the other ranks keep their processes; a crash needs nothing from the agent either way. There,
a mistaken hang verdict costs a second rather than a restart, so without --hang-timeout the timeout comes down from
the default toward the job's own pace (see ``QUICK_HANG_*``), with a floor that doubles at each rank stopped.

Every kind is CLOSED by the first step a restarted (or replacement) rank completes: the ``restart`` event carries
the time to repair (from the fault to that step), the steps lost (redone, in place) and whether the job recovered
in place. Only the node that runs rank 0 reports it, so one restart of the job is one event. Each verdict is
given once: a REPORTED incident is never reported again.

Ranks that report no steps (a user's script without megascope's API: only its rank guard reports) are supervised on
what their process shows (:meth:`IncidentTracker.rank_progressed`): a new output line or a changing stack is
progress (no progress for the hang timeout is a hang), and any sign of life of a restarted rank, CPU time included,
closes the incident. Steps are never made up for them: a crash or hang says "step unknown". A node is on steps
once any of its ranks attached itself (megascope's API or trainer); from then on only steps count, as before.
"""

from __future__ import annotations

import enum
import statistics
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from megascope.protos import events
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2

Clock = Callable[[], float]
"""Unix seconds now: ``time.time`` in the agent, a fake one in tests."""

MIN_HANG_TIMEOUT_SECONDS = 30.0
HANG_TIMEOUT_STEPS = 5.0
"""Without --hang-timeout: the larger of 30 s and this many median step times."""
QUICK_HANG_MIN_SECONDS = 2.0
"""In place, without --hang-timeout, the hang timeout comes down toward the larger of this,"""
QUICK_HANG_P95_GAPS = 5.0
"""this many times the 95th percentile of the gaps between steps (the wall time from one step done to the next:
checkpoints, validation and GC pauses included, which a step's own time leaves out),"""
QUICK_HANG_MAX_GAPS = 2.0
"""and this many times the longest gap lately: a pause the job has already shown, and lived through, is no hang."""
QUICK_HANG_GAPS_NEEDED = 20
"""Gaps seen since the ranks last (re)started before the quick timeout applies; until then, the default."""
QUICK_HANG_BACKOFF_RESET_SECONDS = 600.0
"""Each rank killed for a hang doubles the quick timeout's floor (2 s, 4 s, 8 s, ... up to the default), so a healthy
but slow rank is killed by mistake at most a few times in this many seconds; a quiet stretch this long resets it."""
FIRST_STEP_ALLOWANCE = 3.0
"""Before an attempt's first step (rendezvous, loading, resuming), the timeout is this many times longer."""
CRASH_REPORT_WAIT_SECONDS = 1.0
"""After a rank vanishes, how long to wait for its guard's exit report before naming it without one."""
LOG_TAIL_LINES = 8
"""Lines of the culprit's log kept in the crash event (the traceback's end)."""
# A rank killed by one of these was stopped by torch elastic because another rank failed: not a culprit.
_COLLATERAL_SIGNALS = {"SIGTERM", "SIGINT", "SIGHUP"}
# A rank whose log ends with one of these died because a peer vanished: not a culprit.
_PEER_FAILURE_MARKERS = (
    "Connection closed by peer",
    "Connection reset by peer",
    "connectFullMesh",
    "Broken pipe",
    "remote worker crashing",
    "Socket Timeout",
)

_TRACEBACK = "Traceback (most recent call last)"


def _last_traceback(tail: list[str]) -> int | None:
    """Where ``tail``'s last Python traceback starts (torchrun prefixes its lines "[rank0]: "); None without one.
    The lines from there on tell how the process ended; earlier ones are its past: a rank that lived through a
    peer's failure (recovered in place, it logged "Connection closed by peer") and later fails on its own is a
    culprit, not collateral."""
    starts = [index for index, line in enumerate(tail) if _TRACEBACK in line]
    return starts[-1] if starts else None


_Hang = telemetry_pb2.HangDetail
_Restart = telemetry_pb2.RestartDetail


class IncidentKind(enum.Enum):
    CRASH = "crash"
    HANG = "hang"
    REQUESTED = "requested"
    """A restart asked for through the Restart RPC."""


class IncidentState(enum.IntEnum):
    """Ordered: an incident only moves forward."""

    DETECTED = 1
    REPORTED = 2
    ACTED = 3
    """The agent stopped its ranks for it."""
    CLOSED = 4


class Action(enum.Enum):
    """What the caller must do after a verdict."""

    NONE = "none"
    COLLECT_STACKS = "collect_stacks"
    """A hang is suspected: collect every rank's stacks, diagnose, and call :meth:`IncidentTracker.hang_diagnosed`."""
    STOP_RANKS = "stop_ranks"
    """Stop this node's ranks (torch elastic restarts the job); tell the tracker of each pid (expect_exit)."""
    STOP_CULPRIT = "stop_culprit"
    """Stop the culprit rank only (``Verdict.rank``): with in-place recovery its guard replaces it and the other
    ranks re-form the group without it (engine/recovery.py)."""


_RESTART_CAUSES = {
    IncidentKind.CRASH: _Restart.CAUSE_CRASH,
    IncidentKind.HANG: _Restart.CAUSE_HANG,
    IncidentKind.REQUESTED: _Restart.CAUSE_REQUESTED,
}
_LABELS = {IncidentKind.CRASH: "crash", IncidentKind.HANG: "hang", IncidentKind.REQUESTED: "restart request"}


@dataclass
class Failure:
    """One rank's abnormal end, as far as the agent knows it."""

    rank: int
    pid: int
    seen: float
    """When the agent learned of it (the stream ended or a report came)."""
    report: worker_pb2.ExitReport | None = None
    from_guard: bool = False
    """The report is the rank guard's (how the process really ended), not the rank's own last words."""

    @property
    def died(self) -> float:
        """When it died: the report's time, but never after the agent learned of it (a time from the future would
        make the detection time negative and keep the incident from ever closing)."""
        return min(self.report.wall_time, self.seen) if self.report is not None and self.report.wall_time else self.seen

    @property
    def collateral(self) -> bool:
        """Died because the job was going down anyway: a peer vanished, or torch elastic stopped it (unless it was
        already dying of its own uncaught exception: a slow exit overtaken by the stop)."""
        if self.report is None:
            return False
        tail = list(self.report.log_tail)
        start = _last_traceback(tail)
        ending = tail if start is None else tail[start:]
        if any(marker in line for line in ending for marker in _PEER_FAILURE_MARKERS):
            return True
        return self.report.signal in _COLLATERAL_SIGNALS and start is None

    def how(self) -> str:
        if self.report is None:
            return "ended without a word (its guard did not report)"
        if self.report.signal:
            return f"killed by {self.report.signal}"
        cause = f" ({self.report.cause})" if self.report.cause else ""
        return f"exited with code {self.report.exit_code}{cause}"


@dataclass
class Incident:
    kind: IncidentKind
    started: float
    """When the fault happened: the culprit's death, the last completed step before a hang, the request."""
    step: int | None
    """The newest step completed before the fault; None when no rank reported one."""
    state: IncidentState = IncidentState.DETECTED
    detected: float = 0.0
    """When the verdict was reached (REPORTED)."""
    failures: list[Failure] = field(default_factory=list)

    def advance(self, state: IncidentState) -> None:
        if state < self.state:
            raise AssertionError(f"incident {self.kind.value}: {self.state.name} cannot go back to {state.name}")
        self.state = state


@dataclass(frozen=True)
class Verdict:
    """What the tracker concluded: the incident, the event to record (None: nothing to tell) and what to do."""

    incident: Incident
    event: telemetry_pb2.Event | None = None
    action: Action = Action.NONE
    rank: int | None = None
    """The rank the action is about (STOP_CULPRIT)."""


@dataclass(frozen=True)
class HangFindings:
    """What collecting the stacks found (agent/stacks.py, agent/hang_rules.py)."""

    culprit: int | None
    reason: str
    how: str = ""
    """How the culprit's stacks were read, when not by its own handler: "stopped (SIGSTOP)", "py-spy, ..."."""
    ranks_answered: int = 0
    ranks_total: int = 0


@dataclass
class _Rank:
    pid: int
    attached: float
    live: bool = True


class IncidentTracker:
    """The incident state machine of one node's ranks; see the module docstring."""

    def __init__(self, clock: Clock, hang_timeout: float | None = None, in_place: bool = False) -> None:
        self._clock = clock
        self.hang_timeout = hang_timeout
        """Fixed hang timeout in seconds; None: the larger of 30 s and 5 median step times."""
        self.in_place = in_place
        """The ranks recover in place (``--recovery inplace``): a hang's culprit is stopped alone, not every rank."""
        self.incident: Incident | None = None
        self.closed: list[Incident] = []
        """Closed incidents, oldest first (the restarts of the job seen from this node)."""
        self._ranks: dict[int, _Rank] = {}
        self._expected_exits: set[int] = set()
        """Pids the agent itself stopped: their ends are not crashes."""
        self._last_progress = clock()
        self._progress_step: int | None = None
        self._stepped_since_attach = False
        self.reports_steps = False
        """Some rank of this node attached itself (it reports steps): steps are its only progress signal."""
        self._step_seconds: deque[float] = deque(maxlen=50)
        self._gaps: deque[float] = deque(maxlen=100)
        """Wall seconds between consecutive newest steps, since the ranks last (re)started (the quick timeout's)."""
        self._newest_at: float | None = None
        self._backoff = 1.0
        self._last_culprit_stop: float | None = None

    @property
    def restarts(self) -> int:
        return len(self.closed)

    def current_hang_timeout(self) -> float:
        if self.hang_timeout:
            return self.hang_timeout
        median = statistics.median(self._step_seconds) if self._step_seconds else 0.0
        default = max(MIN_HANG_TIMEOUT_SECONDS, HANG_TIMEOUT_STEPS * median)
        if not self.in_place or len(self._gaps) < QUICK_HANG_GAPS_NEEDED:
            return default
        # In place, a mistaken verdict costs a second (one rank replaced), not a restart of the job: the timeout can
        # follow the job's own pace, bounded below by the pauses it has shown and by the mistakes made lately.
        if self._last_culprit_stop is not None and self._clock() - self._last_culprit_stop > (
            QUICK_HANG_BACKOFF_RESET_SECONDS
        ):
            self._backoff, self._last_culprit_stop = 1.0, None
        gaps = sorted(self._gaps)
        p95 = gaps[min(len(gaps) - 1, int(0.95 * len(gaps)))]
        quick = max(QUICK_HANG_MIN_SECONDS * self._backoff, QUICK_HANG_P95_GAPS * p95, QUICK_HANG_MAX_GAPS * gaps[-1])
        return min(quick, default)

    # --- what the agent learns of its ranks -------------------------------------------------------------

    def rank_attached(self, rank: int, pid: int, reports_steps: bool = True) -> None:
        """A rank's process started: it attached itself (``reports_steps``) or its guard attached for it."""
        now = self._clock()
        self.reports_steps = self.reports_steps or reports_steps
        self._ranks[rank] = _Rank(pid, now)
        # A new process gets the whole (first-step) allowance before it can count as hung.
        self._last_progress = now
        self._stepped_since_attach = False
        self._newest_at = None  # the gap to its first step is a start, not the job's pace

    def rank_stepped(self, rank: int, step: int, step_seconds: float) -> list[Verdict]:
        """A step report; a restarted rank's first one closes the open incident."""
        now = self._clock()
        incident = self.incident
        newest = -1 if self._progress_step is None else self._progress_step
        if step > newest or incident is not None:
            self._last_progress = now
        if incident is not None:
            self._newest_at = None  # the outage is no gap of the job's pace
        elif step > newest:
            if self._newest_at is not None:
                self._gaps.append(now - self._newest_at)
            self._newest_at = now
        # During an incident the newest step is the restarted job's, which starts again from a checkpoint.
        self._progress_step = max(newest, step) if incident is None else step
        self._stepped_since_attach = True
        self._step_seconds.append(step_seconds)
        known = self._ranks.get(rank)
        if incident is None or known is None or known.attached <= incident.started:
            return []
        verdicts = []
        if incident.state is IncidentState.DETECTED and incident.kind is IncidentKind.CRASH:
            verdicts.append(self._report_crash(incident, now))  # never close an incident that was not told
        verdicts.append(self._close(incident, rank, step, now))
        return verdicts

    def rank_progressed(self, rank: int, pid: int, busy_only: bool = False) -> list[Verdict]:
        """Progress of a rank that reports no steps, from its guard: a new output line or a changing stack, or with
        ``busy_only`` just its CPU time advancing (alive, but maybe spinning in a wait: it never counts against a
        hang). Either, from a rank restarted after the open incident began, closes that incident: the time to repair
        runs to the restarted job's first sign of life. Ignored on a node whose ranks report steps."""
        known = self._ranks.get(rank)
        if self.reports_steps or known is None or known.pid != pid or not known.live:
            return []
        now = self._clock()
        if not busy_only:
            self._last_progress = now
            self._stepped_since_attach = True
        incident = self.incident
        if incident is None or known.attached <= incident.started:
            return []
        verdicts = []
        if incident.state is IncidentState.DETECTED and incident.kind is IncidentKind.CRASH:
            verdicts.append(self._report_crash(incident, now))
        verdicts.append(self._close(incident, rank, None, now))
        self._last_progress = now  # the restarted job's hang clock starts here
        return verdicts

    def rank_ended(self, rank: int, pid: int) -> None:
        """The rank's stream ended without it finishing: the process is gone."""
        self._gone(rank, pid)
        self._failure(rank, pid)

    def rank_finished(self, rank: int) -> None:
        """The rank finished training and its stream ended: a clean exit."""
        known = self._ranks.get(rank)
        if known is not None:
            known.live = False

    def exit_reported(self, report: worker_pb2.ExitReport, from_guard: bool) -> None:
        """How a rank ended: its guard's report (``from_guard``: authoritative) or its own last words.

        A report about another process than the one the rank runs as now, while that one is live, is not about
        this rank's present: dropped (it must not open an incident that no restart would ever close)."""
        known = self._ranks.get(report.rank)
        if known is not None and known.live and known.pid != report.pid:
            return
        self._gone(report.rank, report.pid)
        failure = self._failure(report.rank, report.pid)
        if from_guard or failure.report is None:
            failure.report = report
            failure.from_guard = from_guard

    def expect_exit(self, pid: int) -> None:
        """The agent is stopping this process: its end is not a fault."""
        self._expected_exits.add(pid)

    def live_ranks(self) -> list[int]:
        return sorted(rank for rank, known in self._ranks.items() if known.live)

    # --- time passing ---------------------------------------------------------------------------------

    def tick(self) -> list[Verdict]:
        """Called every fraction of a second: a crash to name, a hang suspected, a stalled node that must act."""
        now = self._clock()
        incident = self.incident
        if incident is not None and incident.kind is IncidentKind.CRASH and incident.state is IncidentState.DETECTED:
            return [self._report_crash(incident, now)] if self._crash_ready(incident, now) else []
        if incident is None and self.live_ranks():
            limit = self.current_hang_timeout()
            if not self._stepped_since_attach:
                limit *= FIRST_STEP_ALLOWANCE
            if now - self._last_progress > limit:
                self.incident = Incident(IncidentKind.HANG, self._last_progress, self._progress_step)
                return [Verdict(self.incident, action=Action.COLLECT_STACKS)]
            return []
        if incident is not None and incident.kind is IncidentKind.HANG and incident.state is IncidentState.REPORTED:
            # No culprit here: another node's agent should stop its ranks, and ours would then fail on the broken
            # connections (or restart). If nothing at all happened for one more timeout, stop ours.
            untouched = not incident.failures and all(r.attached < incident.started for r in self._ranks.values())
            if untouched and now - incident.detected > self.current_hang_timeout():
                return [self._hang_without_culprit(incident, now)]
        return []

    # --- answers to the tracker's requests -------------------------------------------------------------

    def hang_diagnosed(self, findings: HangFindings) -> Verdict | None:
        """The stacks of a suspected hang, diagnosed; None when the incident ended meanwhile."""
        incident = self.incident
        if incident is None or incident.kind is not IncidentKind.HANG or incident.state is not IncidentState.DETECTED:
            return None
        now = self._clock()
        incident.detected = now
        incident.advance(IncidentState.REPORTED)
        waited = now - incident.started
        collected = f"stacks of {findings.ranks_answered}/{findings.ranks_total} ranks collected"
        detail = _Hang(
            reason=findings.reason,
            how=findings.how,
            detect_seconds=waited,
            ranks_answered=findings.ranks_answered,
            ranks_total=findings.ranks_total,
        )
        if incident.step is not None:
            detail.last_step = incident.step
        quiet = self._quiet_for(waited, incident.step)
        if findings.culprit is None:
            detail.verdict = _Hang.VERDICT_ELSEWHERE
            text = f"{quiet}; {collected}; {findings.reason}: the culprit may be on another node"
            return Verdict(incident, events.make_event(text, detail, severity=events.WARNING, wall_time=now))
        detail.verdict = _Hang.VERDICT_CULPRIT
        detail.culprit_rank = findings.culprit
        how = f" (its stacks: {findings.how})" if findings.how else ""
        remedy = f"replacing rank {findings.culprit}" if self.in_place else "restarting"
        text = f"rank {findings.culprit} hangs{how}: {findings.reason}; {quiet}; {collected}; {remedy}"
        incident.advance(IncidentState.ACTED)
        event = events.make_event(
            text, detail, severity=events.ERROR, rank=findings.culprit, step=incident.step, wall_time=now
        )
        if self.in_place:
            self._backoff *= 2  # were this verdict a mistake, the next one waits longer (see QUICK_HANG_*)
            self._last_culprit_stop = now
            return Verdict(incident, event, Action.STOP_CULPRIT, rank=findings.culprit)
        return Verdict(incident, event, Action.STOP_RANKS)

    def restart_requested(self, reason: str, from_step: int | None = None) -> Verdict:
        """A user asked for a restart: the ranks are to be stopped; the restart event follows the first step."""
        now = self._clock()
        incident = self.incident
        if incident is None:
            incident = self.incident = Incident(IncidentKind.REQUESTED, now, self._progress_step, detected=now)
            incident.advance(IncidentState.REPORTED)
        if incident.state >= IncidentState.REPORTED:  # a crash not yet named stays to be named
            incident.advance(max(incident.state, IncidentState.ACTED))
        detail = _Restart(phase=_Restart.PHASE_REQUESTED, cause=_Restart.CAUSE_REQUESTED, reason=reason)
        if from_step is not None:
            detail.from_step = from_step
        event = events.make_event(f"restart requested: {reason}", detail, severity=events.WARNING, wall_time=now)
        return Verdict(incident, event, Action.STOP_RANKS)

    # --- inside ---------------------------------------------------------------------------------------

    def _gone(self, rank: int, pid: int) -> None:
        known = self._ranks.get(rank)
        if known is not None and known.pid == pid:
            known.live = False

    def _failure(self, rank: int, pid: int) -> Failure:
        if pid in self._expected_exits:
            return Failure(rank, pid, self._clock())  # stopped by the agent: recorded nowhere
        incident = self.incident
        if incident is None:
            incident = self.incident = Incident(IncidentKind.CRASH, self._clock(), self._progress_step)
        for failure in incident.failures:
            if failure.pid == pid:
                return failure
        failure = Failure(rank, pid, self._clock())
        incident.failures.append(failure)
        return failure

    def _culprits(self, incident: Incident) -> list[Failure]:
        reported = (f for f in incident.failures if f.report is not None and not f.collateral)
        return sorted(reported, key=lambda f: f.died)

    def _crash_ready(self, incident: Incident, now: float) -> bool:
        """A culprit is known, or its guard has had its chance to report."""
        if self._culprits(incident):
            return True
        return bool(incident.failures) and now - min(f.seen for f in incident.failures) >= CRASH_REPORT_WAIT_SECONDS

    def _report_crash(self, incident: Incident, now: float) -> Verdict:
        incident.detected = now
        incident.advance(IncidentState.REPORTED)
        culprits = self._culprits(incident)
        if not culprits:
            culprits = sorted((f for f in incident.failures if f.report is None), key=lambda f: f.seen)
        if not culprits:
            collateral = ", ".join(f"rank {f.rank} ({f.how()})" for f in incident.failures)
            detail = telemetry_pb2.JobDetail(
                phase=telemetry_pb2.JobDetail.PHASE_PEER_FAILED, ranks=sorted(f.rank for f in incident.failures)
            )
            text = f"ranks stopped because a peer failed or torch elastic stopped them: {collateral}"
            return Verdict(incident, events.make_event(text, detail, severity=events.WARNING, wall_time=now))
        culprit = culprits[0]
        incident.started = culprit.died
        report = culprit.report
        detail = telemetry_pb2.CrashDetail(pid=culprit.pid, detect_seconds=now - culprit.died)
        if incident.step is not None:
            detail.last_step = incident.step
        if report is not None:
            detail.exit_code = report.exit_code
            detail.signal = report.signal
            detail.log_tail.extend(list(report.log_tail)[-LOG_TAIL_LINES:])
            detail.restart_count = report.restart_count
            detail.cause = report.cause
        text = (
            f"rank {culprit.rank} (pid {culprit.pid}) {culprit.how()} "
            f"{'(step unknown)' if incident.step is None else _after(incident.step)}; "
            f"detected in {now - culprit.died:.2f}s"
        )
        others = [f for f in incident.failures if f is not culprit]
        if others:
            text += "; then " + ", ".join(f"rank {f.rank} {f.how()}" for f in others)
        event = events.make_event(
            text, detail, severity=events.ERROR, rank=culprit.rank, step=incident.step, wall_time=now
        )
        return Verdict(incident, event)

    def _hang_without_culprit(self, incident: Incident, now: float) -> Verdict:
        incident.advance(IncidentState.ACTED)
        waited = now - incident.started
        detail = _Hang(
            verdict=_Hang.VERDICT_NO_CULPRIT,
            reason="no culprit found here and no other node acted",
            detect_seconds=waited,
        )
        if incident.step is not None:
            detail.last_step = incident.step
        quiet = self._quiet_for(waited, incident.step)
        text = f"{quiet} and no culprit found; stopping this node's ranks so the job restarts"
        return Verdict(
            incident, events.make_event(text, detail, severity=events.ERROR, wall_time=now), Action.STOP_RANKS
        )

    def _quiet_for(self, waited: float, step: int | None) -> str:
        """How long the ranks showed no progress, and after what."""
        if self.reports_steps:
            return f"no step completed for {waited:.1f}s {_after(step)}"
        return f"no progress (no output line, no changing stack) for {waited:.1f}s, {_after(step)}"

    def _close(self, incident: Incident, rank: int, step: int | None, now: float) -> Verdict:
        """Close ``incident`` on the first step (``step``) or, for ranks that report none (None), the first sign of
        life of a restarted rank."""
        incident.advance(IncidentState.CLOSED)
        self.incident = None
        self.closed.append(incident)
        mttr = now - incident.started
        if rank != 0 and 0 not in self._ranks:
            return Verdict(incident)  # the node with rank 0 reports the job's restart
        # In place: some rank kept the process it had before the fault (only the failed ones were replaced).
        in_place = any(known.live and known.attached <= incident.started for known in self._ranks.values())
        detail = _Restart(
            phase=_Restart.PHASE_DONE, cause=_RESTART_CAUSES[incident.kind], mttr_seconds=mttr, in_place=in_place
        )
        # A restart someone asked for is no fault: it reads as done as asked, not as a recovery.
        requested = incident.kind is IncidentKind.REQUESTED
        severity = events.INFO if requested else events.WARNING
        if requested:
            opening = "job restarted as requested"
        elif in_place:
            opening = f"job recovered in place after the {_LABELS[incident.kind]}"
        else:
            opening = f"job restarted after the {_LABELS[incident.kind]}"
        since = "the request" if requested else "the fault"
        if step is None:
            text = (
                f"{opening}: the restarted ranks showed progress {mttr:.1f}s after {since} "
                "(they report no steps: steps lost unknown)"
            )
            return Verdict(incident, events.make_event(text, detail, severity=severity, rank=rank, wall_time=now))
        resumed = step - 1
        lost = max(0, (incident.step or 0) - resumed)
        detail.steps_lost = lost
        detail.resumed_step = resumed
        source = "went on from" if in_place else "resumed from"
        # In place the step in flight is redone too; "lost" counts the completed steps done again.
        outcome = "steps redone" if requested else "completed steps lost" if in_place else "steps lost"
        text = f"{opening}: {source} step {resumed}, first step done {mttr:.1f}s after {since}, {lost} {outcome}"
        event = events.make_event(text, detail, severity=severity, rank=rank, step=resumed, wall_time=now)
        return Verdict(incident, event)


def _after(step: int | None) -> str:
    """The step a fault came after, or "step unknown" when no rank reported one (never a made-up step 0)."""
    return "step unknown" if step is None else f"after step {step}"
