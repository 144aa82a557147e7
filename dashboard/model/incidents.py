"""Incidents: the agents' crashes, hangs and restarts paired into faults, the job giving up, and checkpoints.

Read from the events' typed details, never from their text: a ``CrashDetail`` or a ``HangDetail`` (verdict
culprit or none found) is a fault; a ``RestartDetail`` of phase done is a restart, which ends every fault before
it (the ranks that died of a peer's crash go down in the same incident); a ``JobDetail`` of phase failed means
torch elastic gave up; ``CheckpointDetail`` started, saved and failed give the save in progress and the newest
checkpoint. A restart that says ``in_place`` is a recovery in place (the failed ranks replaced, the others kept):
it counts as a restart of the job (the restart count, MTTR) and reads "recovered in place". The ``recovered``
event (``RecoveryDetail``, from rank 0 of the re-formed group) carries its breakdown and joins the in-place restart
that ends the failure it saw; before that restart event is in, the recovery stands alone for it, so the job reads
as training again as soon as it is. Faults and restarts are paired by time, whatever order they arrive in (each
node's agent reports its own, and back-fills come in any order), and kept apart from the event log, which lets old
events go.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

from megascope.dashboard import formatting as fmt
from megascope.dashboard.model.store import EventLog, StoredEvent
from megascope.protos import events as wire_events
from megascope.protos.megascope.v1 import telemetry_pb2

FAULT_HISTORY = 500
"""Fault events kept: the event log lets go of old ones as other events come; these are few and all count."""
_CHECKPOINT = telemetry_pb2.CheckpointDetail


@dataclass(frozen=True)
class RecoveryView:
    """One recovery in place, from its ``recovered`` event (``RecoveryDetail``): where its time went."""

    wall_time: float
    node: str
    replaced_ranks: tuple[int, ...]
    generation: int
    """The process group's generation the job went on in (the first group is 0)."""
    step: int
    """The step every rank held after the recovery."""
    donor_rank: int
    """The rank whose state (model, optimizer, RNG, data position) the others took."""
    steps_redone: int
    failed_wall_time: float
    """When the first surviving rank saw its collective fail (the detection)."""
    reform_seconds: float
    """From that failure to the new group formed (every rank joined)."""
    transfer_seconds: float
    state_bytes: int
    replacement_ready_seconds: float
    """The replacement, from its fork to its joining the group."""
    total_seconds: float
    """From the failure seen to every rank training again."""

    def summary(self) -> str:
        """The breakdown on one line: ``total 70 ms: re-form 50 ms, state 10.5 MiB in 12 ms, replacement ready in
        20 ms``."""
        return (
            f"total {fmt.seconds(self.total_seconds)}: re-form {fmt.seconds(self.reform_seconds)}, "
            f"state {fmt.size(self.state_bytes)} in {fmt.seconds(self.transfer_seconds)}, "
            f"replacement ready in {fmt.seconds(self.replacement_ready_seconds)}"
        )

    def breakdown(self) -> list[tuple[str, str]]:
        """(name, value) lines, in the order a reader wants them (the event's detail screen)."""
        replaced = ", ".join(str(r) for r in self.replaced_ranks) or "none"
        return [
            ("failure seen", f"{fmt.clock(self.failed_wall_time)} ({self.failed_wall_time:.3f}): detection"),
            ("re-form", f"{fmt.seconds(self.reform_seconds)} (failure seen to the new group formed)"),
            (
                "state transfer",
                f"{fmt.seconds(self.transfer_seconds)}, {fmt.size(self.state_bytes)} from rank {self.donor_rank}",
            ),
            ("replacement ready", f"{fmt.seconds(self.replacement_ready_seconds)} (fork to joining the group)"),
            ("total", f"{fmt.seconds(self.total_seconds)} (failure seen to every rank training again)"),
            ("steps redone", str(self.steps_redone)),
            ("replaced ranks", replaced),
            ("donor rank", str(self.donor_rank)),
            ("generation", str(self.generation)),
            ("went on from step", f"{self.step:,}"),
        ]


@dataclass(frozen=True)
class RestartView:
    """One restart of the job, from its ``restart`` event: what it took to get back to training. A recovery in
    place is one too (``in_place``), with its breakdown (``recovery``) once its ``recovered`` event is in."""

    wall_time: float
    node: str
    cause: str
    """What was restarted after: "crash", "hang" or "manual"; empty when only the ``recovered`` event is in."""
    mttr_seconds: float | None
    """From the fault to the first step done after it."""
    steps_lost: int | None
    """Steps done before the fault that had to be redone (those after the checkpoint resumed from; in place, the
    step in flight)."""
    resumed_step: int | None
    in_place: bool = False
    """The job recovered in place (the failed ranks replaced, the others kept), not by restarting every rank."""
    recovery: RecoveryView | None = None
    """The recovery's breakdown, from its ``recovered`` event."""


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
        line += f" after step {self.step:,}" if self.step is not None else ", step unknown"
        if self.detect_seconds is not None:
            line += f", detected in {self.detect_seconds:.2f}s"
        restart = self.restart
        if restart is None:
            line += "; not restarted yet"
        else:
            line += "; recovered in place" if restart.in_place else "; restarted"
            if restart.resumed_step is not None:
                line += f" from step {restart.resumed_step:,}"
            if restart.mttr_seconds is not None:
                line += f", MTTR {restart.mttr_seconds:.1f}s"
            if restart.recovery is not None:  # in place: the steps redone, the step in flight included
                redone = restart.recovery.steps_redone
                line += f", {redone} step{'s' if redone != 1 else ''} redone"
            elif restart.steps_lost is not None:
                plural = "s" if restart.steps_lost != 1 else ""
                line += f", {restart.steps_lost} {'completed ' if restart.in_place else ''}step{plural} lost"
            if restart.recovery is not None:
                line += f" ({restart.recovery.summary()})"
        if self.kind != "crash":
            line += f"; {self.cause or 'no culprit found'}"
        return line


_RESTART_CAUSES: dict[int, str] = {
    telemetry_pb2.RestartDetail.CAUSE_CRASH: "crash",
    telemetry_pb2.RestartDetail.CAUSE_HANG: "hang",
    telemetry_pb2.RestartDetail.CAUSE_REQUESTED: "manual",
    telemetry_pb2.RestartDetail.CAUSE_NODE_LEFT: "node_left",
}
"""RestartDetail.Cause as the words RestartView.cause (and the demo summary) have always used."""


def is_fault(event: telemetry_pb2.Event) -> bool:
    """A crash, or a hang this node acts on (a culprit, or none found); "stalled" (the culprit is on another
    node, whose agent reports the hang) is not a fault of its own."""
    which = event.WhichOneof("detail")
    return which == "crash" or (which == "hang" and event.hang.verdict != telemetry_pb2.HangDetail.VERDICT_ELSEWHERE)


def is_restart(event: telemetry_pb2.Event) -> bool:
    """The job came back after a fault or a request (not the request itself)."""
    return event.WhichOneof("detail") == "restart" and event.restart.phase == telemetry_pb2.RestartDetail.PHASE_DONE


def is_recovery(event: telemetry_pb2.Event) -> bool:
    """The job recovered in place: rank 0 of the re-formed group says how (its breakdown)."""
    return event.WhichOneof("detail") == "recovery"


def is_job_failed(event: telemetry_pb2.Event) -> bool:
    """Torch elastic gave up on the job."""
    return event.WhichOneof("detail") == "job" and event.job.phase == telemetry_pb2.JobDetail.PHASE_FAILED


def _fault_view(event: telemetry_pb2.Event) -> FaultView:
    """A crash or hang event as a FaultView; the event's own rank and step come first, the detail's fill in."""
    rank = event.rank if event.HasField("rank") else None
    step = event.step if event.HasField("step") else None
    if event.WhichOneof("detail") == "crash":
        crash = event.crash
        code = crash.exit_code
        cause = crash.signal or (f"exit code {code}" if code else "")
        if crash.cause:
            cause = f"{cause}: {crash.cause}" if cause else crash.cause
        detect_seconds = crash.detect_seconds
        if step is None and crash.HasField("last_step"):
            step = crash.last_step
    else:
        hang = event.hang
        cause = hang.reason
        detect_seconds = hang.detect_seconds
        if rank is None and hang.HasField("culprit_rank"):
            rank = hang.culprit_rank
        if step is None:
            step = hang.last_step
    return FaultView(
        kind=wire_events.kind_of(event),
        wall_time=event.wall_time,
        node=event.node,
        rank=rank,
        step=step,
        detect_seconds=detect_seconds,
        cause=cause,
        text=event.text,
    )


def _restart_view(event: telemetry_pb2.Event, recovery: RecoveryView | None = None) -> RestartView:
    restart = event.restart
    return RestartView(
        wall_time=event.wall_time,
        node=event.node,
        cause=_RESTART_CAUSES.get(restart.cause, ""),
        mttr_seconds=restart.mttr_seconds if restart.HasField("mttr_seconds") else None,
        steps_lost=restart.steps_lost if restart.HasField("steps_lost") else None,
        resumed_step=restart.resumed_step if restart.HasField("resumed_step") else None,
        in_place=restart.in_place,
        recovery=recovery,
    )


def recovery_view(event: telemetry_pb2.Event) -> RecoveryView:
    """A ``recovered`` event's breakdown (its ``RecoveryDetail``)."""
    detail = event.recovery
    return RecoveryView(
        wall_time=event.wall_time,
        node=event.node,
        replaced_ranks=tuple(detail.replaced_ranks),
        generation=detail.generation,
        step=detail.step,
        donor_rank=detail.donor_rank,
        steps_redone=detail.steps_redone,
        failed_wall_time=detail.failed_wall_time,
        reform_seconds=detail.reform_seconds,
        transfer_seconds=detail.transfer_seconds,
        state_bytes=detail.state_bytes,
        replacement_ready_seconds=detail.replacement_ready_seconds,
        total_seconds=detail.total_seconds,
    )


def _recovery_alone(recovery: RecoveryView) -> RestartView:
    """A recovery whose ``restart`` event has not come (yet): it stands for it, without an MTTR (the agent's
    restart event measures that, from the fault to the first step done)."""
    return RestartView(
        wall_time=recovery.wall_time,
        node=recovery.node,
        cause="",
        mttr_seconds=None,
        steps_lost=recovery.steps_redone,
        resumed_step=recovery.step,
        in_place=True,
        recovery=recovery,
    )


class _Closer(NamedTuple):
    """A restart of the job as the faults are paired with it."""

    time: float
    """From when it ends the faults before it: its event's time."""
    view: RestartView
    alone: bool
    """A ``recovered`` event standing alone (its restart event not in yet)."""


def _onset(fault: FaultView, closer: _Closer) -> float:
    """When ``fault`` is placed against ``closer``: its event's time, or for a crash against a recovery standing
    alone, the death itself: a recovery in place can be over (tens of ms) before the agent has the rank's exit
    report (up to a second), so the crash's event comes after the recovery that already dealt with it."""
    if fault.kind == "crash" and closer.alone:
        return fault.wall_time - (fault.detect_seconds or 0.0)
    return fault.wall_time


class Incidents:
    """The faults, restarts and checkpoints seen so far (fed every new event of the log)."""

    def __init__(self) -> None:
        self._events = EventLog(lambda: FAULT_HISTORY)
        """Fault, restart, recovered and job-failed events, in time order, each once: its own dedup, so a replayed event
        the event log had already let go of does not count as a second restart."""
        self._checkpoint_saved: tuple[int, float] | None = None
        """(step, wall time) of the newest committed checkpoint the agents reported."""
        self._checkpoint_saving: tuple[int, float] | None = None
        """(step, wall time started) of a save in progress."""
        self._job_phases: dict[str, tuple[float, int]] = {}
        """Node -> (wall time, phase) of the newest ``JobDetail`` event from it: started, finished, failed ..."""

    def track(self, stored: StoredEvent) -> None:
        event = stored.event
        which = event.WhichOneof("detail")
        if which == "checkpoint":
            self._track_checkpoint(event.checkpoint, event.wall_time)
        elif is_fault(event) or is_restart(event) or is_recovery(event) or is_job_failed(event):
            self._events.add(stored)
        if which == "job":
            newest = self._job_phases.get(event.node)
            if newest is None or event.wall_time >= newest[0]:
                self._job_phases[event.node] = (event.wall_time, event.job.phase)

    def _track_checkpoint(self, detail: telemetry_pb2.CheckpointDetail, wall_time: float) -> None:
        step = detail.step
        if detail.phase == _CHECKPOINT.PHASE_STARTED:
            if self._checkpoint_saved is None or step > self._checkpoint_saved[0]:
                self._checkpoint_saving = (step, wall_time)
            return
        if detail.phase not in (_CHECKPOINT.PHASE_SAVED, _CHECKPOINT.PHASE_FAILED):
            return  # requested, refused, cleanup: no save ran or ends here
        if self._checkpoint_saving is not None and self._checkpoint_saving[0] == step:
            self._checkpoint_saving = None
        if detail.phase == _CHECKPOINT.PHASE_SAVED and (
            self._checkpoint_saved is None or step >= self._checkpoint_saved[0]
        ):
            self._checkpoint_saved = (step, wall_time)

    # -- what the views read -------------------------------------------------------------------------------

    def _restarts(self) -> list[_Closer]:
        """Every restart of the job, recoveries in place included, in time order, each with the time from which it
        ends the faults before it. A ``restart`` event that says ``in_place`` is joined to the newest ``recovered``
        event whose failure came after the restart before it; a ``recovered`` event joined to none stands alone
        (its restart event has not come yet): one recovery, one restart of the job."""
        restart_events = [s.event for s in self._events if is_restart(s.event)]
        unjoined = [recovery_view(s.event) for s in self._events if is_recovery(s.event)]
        out: list[_Closer] = []
        after = float("-inf")
        for event in restart_events:
            mine = [r for r in unjoined if after < r.failed_wall_time <= event.wall_time]
            joined = max(mine, key=lambda r: r.failed_wall_time) if mine and event.restart.in_place else None
            if joined is not None:
                unjoined.remove(joined)
            out.append(_Closer(event.wall_time, _restart_view(event, joined), alone=False))
            after = event.wall_time
        out += [_Closer(recovery.wall_time, _recovery_alone(recovery), alone=True) for recovery in unjoined]
        out.sort(key=lambda closer: closer.time)
        return out

    def faults(self) -> list[FaultView]:
        """Every crash and hang, oldest first; each with the first restart (or recovery in place) after it."""
        faults = [_fault_view(s.event) for s in self._events if is_fault(s.event)]
        out: list[FaultView] = []
        open_from = 0
        restarts = self._restarts()
        for fault in faults:
            # The restarts that came before this fault end the faults before it; ties: the restart ends the fault.
            while restarts and restarts[0].time < _onset(fault, restarts[0]):
                restart = restarts.pop(0).view
                out[open_from:] = [dataclasses.replace(f, restart=restart) for f in out[open_from:]]
                open_from = len(out)
            out.append(fault)
        if restarts:
            restart = restarts[0].view
            out[open_from:] = [dataclasses.replace(f, restart=restart) for f in out[open_from:]]
        return out

    def restarts(self) -> list[RestartView]:
        """Every restart of the job (recoveries in place included), oldest first."""
        return [closer.view for closer in self._restarts()]

    def recoveries(self) -> list[RecoveryView]:
        """Every recovery in place (its ``recovered`` event), oldest first."""
        return [recovery_view(s.event) for s in self._events if is_recovery(s.event)]

    def restart_count(self) -> int:
        """Restarts of the job, recoveries in place included (one per restart: only the node with rank 0 reports
        them, and a recovery's ``recovered`` event joins its ``restart`` event rather than counting again)."""
        return len(self._restarts())

    def job_failed(self) -> str | None:
        """The newest ``job_failed`` text, unless the job restarted after it (a new attempt under the same agents)."""
        last_restart = max((closer.time for closer in self._restarts()), default=None)
        for stored in reversed(self._events):
            if last_restart is not None and stored.event.wall_time <= last_restart:
                return None
            if is_job_failed(stored.event):
                return stored.event.text
        return None

    def node_finished(self, node: str) -> bool:
        """The newest job event from ``node`` says its ranks finished (a clean end, not a failure)."""
        phase = self._job_phases.get(node)
        return phase is not None and phase[1] == telemetry_pb2.JobDetail.PHASE_FINISHED

    def job_finished(self, nodes: list[str]) -> float | None:
        """When the last of ``nodes`` finished, if every one of them has; None while any is training (or none
        is known)."""
        if not nodes or not all(self.node_finished(node) for node in nodes):
            return None
        return max(self._job_phases[node][0] for node in nodes)

    def newest_checkpoint_step(self) -> int | None:
        """The step of the newest committed checkpoint the agents reported; None before any."""
        return self._checkpoint_saved[0] if self._checkpoint_saved is not None else None

    def checkpoint_summary(self, now: float) -> str | None:
        """ "saving step 50" while a save runs, else "step 40, 12s ago"; None before any checkpoint event."""
        if self._checkpoint_saving is not None:
            return f"saving step {self._checkpoint_saving[0]}"
        if self._checkpoint_saved is not None:
            step, when = self._checkpoint_saved
            return f"step {step}, {fmt.duration(max(0.0, now - when))} ago"
        return None
