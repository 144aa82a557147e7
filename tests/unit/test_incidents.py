"""Supervision's incident logic (agent/incidents.py) fed scripted rank lifecycles and a fake clock: no process,
no gRPC, no sleeping."""

from __future__ import annotations

import pytest

from megascope.agent.incidents import (
    CRASH_REPORT_WAIT_SECONDS,
    FIRST_STEP_ALLOWANCE,
    MIN_HANG_TIMEOUT_SECONDS,
    QUICK_HANG_BACKOFF_RESET_SECONDS,
    Action,
    HangFindings,
    Incident,
    IncidentKind,
    IncidentState,
    IncidentTracker,
    Verdict,
)
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2

Hang = telemetry_pb2.HangDetail
Restart = telemetry_pb2.RestartDetail
TIMEOUT = 10.0


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Node:
    """A node's ranks as the agent sees them, scripted: each rank has a pid; steps take one second."""

    def __init__(self, ranks: tuple[int, ...] = (0, 1), hang_timeout: float | None = TIMEOUT) -> None:
        self.clock = Clock()
        self.tracker = IncidentTracker(self.clock, hang_timeout)
        self.pids = {rank: 100 + rank for rank in ranks}
        self.step = 0
        for rank in ranks:
            self.tracker.rank_attached(rank, self.pids[rank])

    def steps(self, count: int, ranks: tuple[int, ...] | None = None) -> list[Verdict]:
        verdicts = []
        for _ in range(count):
            self.clock.advance(1.0)
            self.step += 1
            for rank in ranks if ranks is not None else tuple(self.pids):
                verdicts += self.tracker.rank_stepped(rank, self.step, 1.0)
        return verdicts

    def restart(self, resume_from: int, ranks: tuple[int, ...] | None = None) -> None:
        """torch elastic starts the ranks again (new pids); they resume after checkpoint ``resume_from``."""
        for rank in ranks if ranks is not None else tuple(self.pids):
            self.pids[rank] += 1000
            self.tracker.rank_attached(rank, self.pids[rank])
        self.step = resume_from

    def dies(self, rank: int, signal: str = "", exit_code: int = 0, ago: float = 0.0, tail: str = "") -> None:
        """The rank's stream ends and its guard reports how (its death was ``ago`` seconds before)."""
        self.tracker.rank_ended(rank, self.pids[rank])
        self.tracker.exit_reported(self.report(rank, signal, exit_code, ago, tail), from_guard=True)

    def report(
        self, rank: int, signal: str = "", exit_code: int = 0, ago: float = 0.0, tail: str = ""
    ) -> worker_pb2.ExitReport:
        return worker_pb2.ExitReport(
            rank=rank, pid=self.pids[rank], signal=signal, exit_code=exit_code, wall_time=self.clock.now - ago,
            log_tail=tail.splitlines(),
        )  # fmt: skip

    def tick(self, seconds: float = 0.2) -> list[Verdict]:
        self.clock.advance(seconds)
        return self.tracker.tick()


def only_event(verdicts: list[Verdict]) -> telemetry_pb2.Event:
    events = [v.event for v in verdicts if v.event is not None]
    assert len(events) == 1, [e.kind for e in events]
    return events[0]


# --- crash -------------------------------------------------------------------------------------------------


def test_a_crash_names_the_first_rank_to_die_with_its_signal_and_detect_time_and_tells_collateral_apart() -> None:
    node = Node((0, 1))
    node.steps(6)
    node.dies(1, signal="SIGKILL", ago=0.3)
    node.dies(0, signal="SIGTERM")  # torch elastic stopped it: collateral
    [verdict] = node.tick()
    event = verdict.event
    assert event is not None and event.kind == "crash" and event.rank == 1 and event.step == 6
    assert event.crash.signal == "SIGKILL" and event.crash.pid == 101 and event.crash.last_step == 6
    assert event.crash.detect_seconds == pytest.approx(0.5)  # died 0.3 s before the end was learned, 0.2 s tick
    assert (
        "rank 1 (pid 101) killed by SIGKILL after step 6" in event.text
        and "then rank 0 killed by SIGTERM" in event.text
    )
    assert verdict.action is Action.NONE  # torch elastic restarts the ranks
    assert verdict.incident.state is IncidentState.REPORTED


def test_a_crash_is_reported_once() -> None:
    node = Node((0, 1))
    node.steps(3)
    node.dies(0, exit_code=1)
    assert only_event(node.tick()).kind == "crash"
    node.dies(1, exit_code=1)  # a second death in the same incident
    assert node.tick() == [] and node.tick(5.0) == []


def test_a_ranks_own_failure_report_names_it_at_once_and_its_guards_report_wins() -> None:
    node = Node((0, 1))
    node.steps(4)
    own = node.report(1, exit_code=1, tail="Traceback (most recent call last):\nRuntimeError: boom")
    node.tracker.exit_reported(own, from_guard=False)
    node.tracker.exit_reported(node.report(1, exit_code=7, tail="the guard's tail"), from_guard=True)
    node.tracker.exit_reported(own, from_guard=False)  # a late copy of the rank's words changes nothing
    event = only_event(node.tick())
    assert event.rank == 1 and event.crash.exit_code == 7 and "exited with code 7" in event.text
    assert list(event.crash.log_tail) == ["the guard's tail"]


def test_a_crash_event_says_what_the_exit_code_means_when_the_guard_told_it() -> None:
    node = Node((0, 1))
    node.steps(3)
    report = node.report(1, exit_code=76)
    report.cause = "left: never saw its collective fail after a peer was replaced; replaced in place"
    node.tracker.rank_ended(1, node.pids[1])
    node.tracker.exit_reported(report, from_guard=True)
    event = only_event(node.tick())
    assert event.crash.cause == report.cause
    assert f"exited with code 76 ({report.cause})" in event.text


def test_the_crash_event_keeps_the_end_of_the_log() -> None:
    node = Node((0,))
    node.steps(2)
    node.dies(0, exit_code=1, tail="\n".join(f"line {i}" for i in range(40)))
    event = only_event(node.tick())
    assert list(event.crash.log_tail) == [f"line {i}" for i in range(32, 40)]


def test_a_rank_whose_guard_never_reports_is_named_after_a_wait() -> None:
    node = Node((0, 1))
    node.steps(2)
    node.tracker.rank_ended(1, node.pids[1])
    assert node.tick(CRASH_REPORT_WAIT_SECONDS / 2) == []
    event = only_event(node.tick(CRASH_REPORT_WAIT_SECONDS))
    assert event.rank == 1 and "ended without a word" in event.text and not event.crash.signal


def test_a_node_whose_ranks_only_died_of_collateral_causes_says_a_peer_failed() -> None:
    node = Node((2, 3))
    node.steps(5)
    node.dies(2, exit_code=1, tail="RuntimeError: Connection closed by peer")
    node.dies(3, signal="SIGTERM")
    event = only_event(node.tick(CRASH_REPORT_WAIT_SECONDS))
    assert event.kind == "peer_failed" and event.job.phase == telemetry_pb2.JobDetail.PHASE_PEER_FAILED
    assert list(event.job.ranks) == [2, 3] and not event.HasField("rank")


def test_a_rank_that_lived_through_a_peers_failure_and_then_fails_on_its_own_is_the_culprit() -> None:
    node = Node((0, 1))
    node.steps(5)
    survived = "megascope: rank 1: a collective failed at step 3 (Connection closed by peer); recovering in place"
    traceback = '[rank1]: Traceback (most recent call last):\n[rank1]:   File "train.py"\n[rank1]: RuntimeError: OOM'
    node.dies(1, exit_code=1, tail=f"{survived}\n{traceback}")
    event = only_event(node.tick(CRASH_REPORT_WAIT_SECONDS))
    assert event.kind == "crash" and event.rank == 1


def test_a_rank_stopped_by_torch_elastic_while_dying_of_its_own_exception_is_still_the_culprit() -> None:
    # Rank 1 raised, and while its interpreter shut down (slowly), rank 0 aborted on the broken connection and torch
    # elastic sent rank 1 SIGTERM: the signal ended it, its own error killed it.
    node = Node((0, 1))
    node.steps(5)
    own = '[rank1]: Traceback (most recent call last):\n[rank1]:   File "train.py"\n[rank1]: RuntimeError: bad batch'
    node.dies(0, signal="SIGABRT", tail="RuntimeError: [pair.cc:553] Connection closed by peer")
    node.dies(1, signal="SIGTERM", tail=own)
    event = only_event(node.tick(CRASH_REPORT_WAIT_SECONDS))
    assert event.kind == "crash" and event.rank == 1 and "killed by SIGTERM" in event.text


def test_a_traceback_that_ends_with_a_peers_failure_is_collateral() -> None:
    node = Node((0, 1))
    node.steps(5)
    broken = 'Traceback (most recent call last):\n  File "train.py", line 9\nRuntimeError: Connection closed by peer'
    node.dies(1, exit_code=1, tail=f"step 5 done\n{broken}", ago=0.1)  # first to go, but because of rank 0
    node.dies(0, signal="SIGKILL")
    event = only_event(node.tick(CRASH_REPORT_WAIT_SECONDS))
    assert event.kind == "crash" and event.rank == 0 and "then rank 1 exited with code 1" in event.text


def test_ranks_the_agent_stopped_and_ranks_that_finished_are_no_crash() -> None:
    node = Node((0, 1))
    node.steps(3)
    node.tracker.expect_exit(node.pids[0])
    node.dies(0, signal="SIGKILL")
    node.tracker.rank_finished(1)
    assert node.tick(5.0) == [] and node.tracker.incident is None


# --- hang --------------------------------------------------------------------------------------------------


def test_no_step_for_the_timeout_is_a_hang_and_the_culprit_here_stops_the_ranks() -> None:
    node = Node((0, 1, 2, 3))
    node.steps(6)
    assert node.tick(TIMEOUT - 1) == []
    [suspected] = node.tick(2.0)
    assert suspected.action is Action.COLLECT_STACKS and suspected.event is None
    assert suspected.incident.kind is IncidentKind.HANG and suspected.incident.state is IncidentState.DETECTED
    assert node.tick() == []  # collecting: nothing more until the diagnosis
    node.clock.advance(1.5)
    verdict = node.tracker.hang_diagnosed(HangFindings(2, "rank 2 lags", "stopped (SIGSTOP)", 3, 4))
    assert verdict is not None and verdict.action is Action.STOP_RANKS
    event = verdict.event
    assert event is not None and event.kind == "hang" and event.rank == 2 and event.step == 6
    assert event.hang.verdict == Hang.VERDICT_CULPRIT and event.hang.culprit_rank == 2
    assert event.hang.detect_seconds == pytest.approx(TIMEOUT + 1 + 0.2 + 1.5 + 0.2 + 0.0, abs=0.3)
    assert "stacks of 3/4 ranks collected" in event.text and "stopped (SIGSTOP)" in event.text
    assert verdict.incident.state is IncidentState.ACTED
    assert node.tick(3 * TIMEOUT) == []  # acted once


def test_a_node_without_the_culprit_waits_one_more_timeout_then_stops_its_ranks() -> None:
    node = Node((0, 1))
    node.steps(4)
    [suspected] = node.tick(TIMEOUT + 1)
    verdict = node.tracker.hang_diagnosed(HangFindings(None, "no rank stands out", ranks_answered=2, ranks_total=2))
    assert verdict is not None and verdict.action is Action.NONE and verdict.event is not None
    assert verdict.event.kind == "stalled" and verdict.event.hang.verdict == Hang.VERDICT_ELSEWHERE
    assert node.tick(TIMEOUT - 1) == []
    [stop] = node.tick(2.0)
    assert stop.action is Action.STOP_RANKS and stop.event is not None and stop.event.kind == "hang"
    assert stop.event.hang.verdict == Hang.VERDICT_NO_CULPRIT and not stop.event.HasField("rank")
    assert node.tick(3 * TIMEOUT) == []


def test_a_stalled_node_whose_ranks_die_of_the_culprits_restart_does_not_stop_them_again() -> None:
    node = Node((0, 1))
    node.steps(4)
    node.tick(TIMEOUT + 1)
    node.tracker.hang_diagnosed(HangFindings(None, "no rank stands out", ranks_answered=2, ranks_total=2))
    node.dies(0, exit_code=1, tail="Connection reset by peer")  # the other node stopped its ranks
    assert node.tick(3 * TIMEOUT) == []


def test_before_its_first_step_a_rank_gets_a_longer_allowance() -> None:
    node = Node((0,))
    assert node.tick(TIMEOUT * FIRST_STEP_ALLOWANCE - 1) == []
    [suspected] = node.tick(2.0)
    assert suspected.action is Action.COLLECT_STACKS


def test_the_default_hang_timeout_is_thirty_seconds_or_five_median_steps() -> None:
    node = Node((0,), hang_timeout=None)
    assert node.tracker.current_hang_timeout() == MIN_HANG_TIMEOUT_SECONDS
    for step in range(1, 8):
        node.tracker.rank_stepped(0, step, 20.0)
    assert node.tracker.current_hang_timeout() == 100.0


def test_no_ranks_no_hang() -> None:
    node = Node((0,))
    node.tracker.rank_finished(0)
    assert node.tick(10 * TIMEOUT) == []


# --- restart -----------------------------------------------------------------------------------------------


def crashed_and_restarted(ranks: tuple[int, ...], culprit: int, repair_seconds: float = 0.0) -> tuple[Node, float]:
    """A node whose ``culprit`` was killed after step 6, and whose ranks torch elastic restarted from step 4; and
    when the culprit died."""
    node = Node(ranks)
    node.steps(6)
    died = node.clock.now
    node.dies(culprit, signal="SIGKILL")
    node.tick()
    node.clock.advance(repair_seconds)
    node.restart(resume_from=4)
    return node, died


def test_the_first_step_of_any_restarted_rank_closes_the_incident() -> None:
    node, _ = crashed_and_restarted((0, 1), culprit=1)
    event = only_event(node.steps(1, ranks=(1,)))  # rank 1 first: this node runs rank 0, so it reports
    assert event.kind == "restart" and event.rank == 1
    [incident] = node.tracker.closed
    assert incident.state is IncidentState.CLOSED and node.tracker.incident is None and node.tracker.restarts == 1


def test_the_restart_event_reports_the_mttr_and_the_steps_lost() -> None:
    node, died = crashed_and_restarted((0, 1), culprit=1, repair_seconds=5.0)
    event = only_event(node.steps(1, ranks=(0,)))
    assert event.kind == "restart" and event.rank == 0 and event.step == 4
    assert event.restart.phase == Restart.PHASE_DONE and event.restart.cause == Restart.CAUSE_CRASH
    assert event.restart.mttr_seconds == pytest.approx(node.clock.now - died)
    assert event.restart.steps_lost == 2 and event.restart.resumed_step == 4
    assert "resumed from step 4" in event.text
    assert node.steps(3) == []  # closed once


def test_a_step_from_a_rank_that_was_not_restarted_does_not_close_the_incident() -> None:
    node = Node((0, 1))
    node.steps(3)
    node.dies(1, signal="SIGKILL")
    node.tick()
    assert node.steps(1, ranks=(0,)) == [] and node.tracker.incident is not None


def test_only_the_node_that_runs_rank_0_reports_the_restart() -> None:
    node, _ = crashed_and_restarted((2, 3), culprit=3)
    verdicts = node.steps(1)
    assert [v.event for v in verdicts] == [None] and node.tracker.restarts == 1


def test_a_crash_closed_before_it_was_named_is_named_first() -> None:
    node = Node((0,))
    node.steps(3)
    node.dies(0, signal="SIGSEGV")
    node.clock.advance(0.5)  # torch elastic restarts it before the agent's next tick
    node.restart(resume_from=2)
    verdicts = node.steps(1)
    assert [v.event.kind for v in verdicts if v.event is not None] == ["crash", "restart"]


def test_a_requested_restart_stops_the_ranks_and_closes_with_its_cause() -> None:
    node = Node((0, 1))
    node.steps(9)
    verdict = node.tracker.restart_requested("from the dashboard; resuming from step 4", from_step=4)
    assert verdict.action is Action.STOP_RANKS and verdict.incident.state is IncidentState.ACTED
    event = verdict.event
    assert event is not None and event.kind == "restart_requested" and event.restart.from_step == 4
    for rank in (0, 1):
        node.tracker.expect_exit(node.pids[rank])
        node.dies(rank, signal="SIGKILL")
    assert node.tick(5.0) == []  # the agent's own kills are no crash
    node.restart(resume_from=4)
    closed = only_event(node.steps(1))
    assert closed.restart.cause == Restart.CAUSE_REQUESTED and closed.restart.steps_lost == 5


def test_a_requested_restart_reads_as_done_as_asked_not_as_a_fault() -> None:
    node = Node((0, 1))
    node.steps(9)
    node.tracker.restart_requested("from the dashboard", from_step=4)
    for rank in (0, 1):
        node.tracker.expect_exit(node.pids[rank])
        node.dies(rank, signal="SIGKILL")
    node.tick(5.0)
    node.restart(resume_from=4)
    closed = only_event(node.steps(1))
    assert closed.severity == telemetry_pb2.Event.SEVERITY_INFO
    assert closed.text.startswith("job restarted as requested: resumed from step 4") and "5 steps redone" in closed.text


def test_a_hang_is_closed_by_the_restart_it_caused() -> None:
    node = Node((0, 1))
    node.steps(6)
    node.tick(TIMEOUT + 1)
    node.tracker.hang_diagnosed(HangFindings(1, "rank 1 lags", ranks_answered=2, ranks_total=2))
    node.restart(resume_from=3)
    event = only_event(node.steps(1))
    assert event.restart.cause == Restart.CAUSE_HANG and event.restart.steps_lost == 3


def test_an_incident_never_goes_back() -> None:
    incident = Incident(IncidentKind.CRASH, 0.0, 0, state=IncidentState.REPORTED)
    with pytest.raises(AssertionError, match="cannot go back"):
        incident.advance(IncidentState.DETECTED)


# --- ranks that report no steps (a script without megascope's API: only its guard reports) -----------------------


class ScriptNode(Node):
    """A node whose ranks run a script that never calls megascope: their guards attach and report output and CPU."""

    def __init__(self, ranks: tuple[int, ...] = (0, 1), hang_timeout: float | None = TIMEOUT) -> None:
        self.clock = Clock()
        self.tracker = IncidentTracker(self.clock, hang_timeout)
        self.pids = {rank: 100 + rank for rank in ranks}
        self.step = 0
        for rank in ranks:
            self.tracker.rank_attached(rank, self.pids[rank], reports_steps=False)

    def writes(self, seconds: float = 1.0, busy_only: bool = False) -> list[Verdict]:
        """Every rank writes a line (or, ``busy_only``, only burns CPU time) after ``seconds``."""
        self.clock.advance(seconds)
        verdicts = []
        for rank, pid in self.pids.items():
            verdicts += self.tracker.rank_progressed(rank, pid, busy_only=busy_only)
        return verdicts

    def restart(self, resume_from: int = 0, ranks: tuple[int, ...] | None = None) -> None:
        for rank in ranks if ranks is not None else tuple(self.pids):
            self.pids[rank] += 1000
            self.tracker.rank_attached(rank, self.pids[rank], reports_steps=False)

    def exits(self, rank: int, exit_code: int = 1) -> None:
        """The rank's guard reports its abnormal end (the only word a script's rank gets)."""
        self.tracker.exit_reported(self.report(rank, exit_code=exit_code), from_guard=True)


def test_a_crash_of_a_rank_that_reports_no_steps_says_step_unknown_never_step_0() -> None:
    node = ScriptNode()
    node.writes(5.0)
    node.exits(1)
    crash = only_event(node.tick())
    assert crash.kind == "crash" and crash.rank == 1 and "(step unknown)" in crash.text
    assert not crash.HasField("step") and not crash.crash.HasField("last_step")


def test_the_first_sign_of_life_of_a_restarted_script_closes_the_incident_with_the_time_to_repair() -> None:
    node = ScriptNode()
    node.writes()
    node.exits(1)
    node.tick()
    node.clock.advance(2.0)
    node.restart()
    restart = only_event(node.writes(1.0, busy_only=True))  # CPU time advancing: the restarted ranks are alive
    assert restart.kind == "restart" and restart.restart.cause == Restart.CAUSE_CRASH
    assert restart.restart.mttr_seconds == pytest.approx(3.2)
    assert not restart.restart.HasField("resumed_step") and "steps lost unknown" in restart.text
    assert node.tracker.incident is None and node.tracker.restarts == 1


def test_each_crash_of_a_script_is_reported_and_each_restart_counted() -> None:
    node = ScriptNode()
    for attempt in range(3):
        node.writes()
        node.exits(1)
        assert only_event(node.tick()).kind == "crash"
        node.restart()
        assert only_event(node.writes()).kind == "restart"
        assert node.tracker.restarts == attempt + 1


def test_a_script_that_writes_nothing_for_the_timeout_hangs_even_while_its_cpu_time_advances() -> None:
    node = ScriptNode()
    node.writes()
    for _ in range(int(TIMEOUT)):
        assert node.writes(1.0, busy_only=True) == []  # spinning in a wait: alive, but no progress
    [verdict] = node.tick()
    assert verdict.action is Action.COLLECT_STACKS and verdict.incident.step is None
    diagnosed = node.tracker.hang_diagnosed(HangFindings(culprit=1, reason="its stack differs"))
    assert diagnosed is not None and diagnosed.event is not None
    assert "step unknown" in diagnosed.event.text and not diagnosed.event.hang.HasField("last_step")


def test_output_lines_keep_a_script_from_counting_as_hung() -> None:
    node = ScriptNode()
    for _ in range(3 * int(TIMEOUT)):
        node.writes(1.0)
        assert node.tick() == []


def test_on_a_node_whose_ranks_report_steps_their_guards_progress_neither_closes_nor_holds_off_anything() -> None:
    node = Node()
    node.steps(3)
    node.dies(1, exit_code=1)
    node.tick(CRASH_REPORT_WAIT_SECONDS)
    node.restart(resume_from=2)
    assert node.tracker.rank_progressed(0, node.pids[0]) == []  # only the first step closes it
    assert node.tracker.incident is not None
    assert only_event(node.steps(1)).kind == "restart"


def test_a_rank_and_its_guard_attached_for_one_process_make_one_crash_and_one_restart() -> None:
    node = Node()
    for rank, pid in node.pids.items():
        node.tracker.rank_attached(rank, pid, reports_steps=False)  # the guard, after the rank itself
    node.steps(3)
    node.dies(1, exit_code=1)  # the rank's stream ends, and its guard reports
    node.tracker.exit_reported(node.report(1, exit_code=1), from_guard=True)  # ... once more: the same death
    assert only_event(node.tick()).kind == "crash"
    node.restart(resume_from=2)
    for rank, pid in node.pids.items():
        node.tracker.rank_attached(rank, pid, reports_steps=False)
    assert only_event(node.steps(1)).kind == "restart"
    assert node.tracker.restarts == 1 and node.tick() == []


# --- in-place recovery (--recovery inplace) ------------------------------------------------------------------


def test_in_place_a_hangs_culprit_is_stopped_alone() -> None:
    node = Node((0, 1, 2, 3))
    node.tracker.in_place = True
    node.steps(6)
    [suspected] = node.tick(TIMEOUT + 1)
    assert suspected.action is Action.COLLECT_STACKS
    verdict = node.tracker.hang_diagnosed(HangFindings(2, "rank 2 lags", "", 4, 4))
    assert verdict is not None and verdict.action is Action.STOP_CULPRIT and verdict.rank == 2
    assert verdict.event is not None and "replacing rank 2" in verdict.event.text


def test_a_crash_recovered_in_place_closes_with_in_place_and_the_steps_redone() -> None:
    node = Node((0, 1, 2, 3))
    node.steps(6)
    died = node.clock.now
    node.dies(2, signal="SIGKILL")
    node.tick()
    node.clock.advance(0.5)
    node.restart(resume_from=6, ranks=(2,))  # only the culprit is replaced; the others keep their processes
    event = only_event(node.steps(1))
    assert event.kind == "restart" and event.restart.in_place and event.restart.steps_lost == 0
    assert event.restart.mttr_seconds == pytest.approx(node.clock.now - died)
    assert "job recovered in place after the crash: went on from step 6" in event.text


def test_a_job_whose_every_rank_restarted_is_not_in_place() -> None:
    node, _ = crashed_and_restarted((0, 1), culprit=1)
    event = only_event(node.steps(1))
    assert not event.restart.in_place and "job restarted after the crash" in event.text


def in_place_node_after(steps: int) -> Node:
    node = Node((0, 1, 2, 3), hang_timeout=None)
    node.tracker.in_place = True
    node.steps(steps)  # one step a second
    return node


def test_in_place_the_default_hang_timeout_follows_the_jobs_pace_once_it_has_shown_it() -> None:
    assert in_place_node_after(10).tracker.current_hang_timeout() == MIN_HANG_TIMEOUT_SECONDS  # too few gaps yet
    assert in_place_node_after(40).tracker.current_hang_timeout() == pytest.approx(5.0)  # 5 x the 1 s gaps


def test_without_in_place_recovery_the_default_hang_timeout_stays_thirty_seconds() -> None:
    node = Node((0, 1), hang_timeout=None)
    node.steps(40)
    assert node.tracker.current_hang_timeout() == MIN_HANG_TIMEOUT_SECONDS


def test_in_place_a_pause_the_job_has_lived_through_is_not_taken_for_a_hang() -> None:
    node = in_place_node_after(30)
    node.clock.advance(7.0)  # a long checkpoint or validation between two steps
    node.steps(5)
    assert node.tracker.current_hang_timeout() == pytest.approx(2 * 8.0)


def test_in_place_each_rank_stopped_for_a_hang_doubles_the_quick_timeouts_floor_until_a_quiet_stretch() -> None:
    node = in_place_node_after(40)
    node.clock.advance(0.5)
    for _ in range(3):  # three hang verdicts, each stopping a culprit that may have been merely slow
        node.tracker.incident = Incident(IncidentKind.HANG, node.clock.now, node.step)
        node.tracker.hang_diagnosed(HangFindings(1, "rank 1 lags"))
        node.tracker.incident = None
    assert node.tracker.current_hang_timeout() == pytest.approx(2.0 * 8)  # 2 s doubled three times
    node.clock.advance(QUICK_HANG_BACKOFF_RESET_SECONDS + 1)
    assert node.tracker.current_hang_timeout() == pytest.approx(5.0)
