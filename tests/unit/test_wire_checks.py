"""Issue 17, the worker channel and the wire, where the logic is pure: what a rank may claim (agent/validation.py),
which processes the agent signals (agent/processes.py, agent/stacks.py), the caps on history and answers
(agent/state.py), a forged exit time (agent/incidents.py) and StartMerge's bounds (agent/merges.py). The same
findings against a real agent: tests/integration/test_hardening_wire.py (this file is the pure half)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from megascope.agent import stacks
from megascope.agent.incidents import IncidentTracker
from megascope.agent.merges import MAX_MERGE_INPUTS, MergeRefused, plan_merge
from megascope.agent.processes import is_descendant, signal_descendant
from megascope.agent.state import MAX_ANSWER_BYTES, HistoryLimits, NodeState
from megascope.agent.validation import (
    CLOCK_SKEW_SECONDS,
    MAX_ERROR_CHARS,
    MAX_LOG_LINES,
    MAX_SCALAR_NAME_CHARS,
    MAX_SCALARS,
    MAX_TEXT_BYTES,
    InvalidMessage,
    Launched,
    trim_event,
    trim_exit_report,
    trim_scalars,
    validate_event,
    validate_exit_report,
    validate_failure,
    validate_heartbeat,
    validate_hello,
    validate_progress,
    validate_step_report,
)
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

NOW = 1_800_000_000.0
STARTED = NOW - 100
OURS = {4242, 4243}
LAUNCHED = Launched(
    started=STARTED, world_sizes=(2, 2), local_world_size=2, owns_pid=OURS.__contains__, stacks_dir="/run/stacks"
)
HELLO = worker_pb2.Hello(rank=1, local_rank=1, world_size=2, pid=4243, stack_file="/run/stacks/rank1.txt")


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield process
    process.kill()
    process.wait()


# --- what a rank may claim ------------------------------------------------------------------------------------


def test_the_hello_a_launched_rank_sends_is_accepted() -> None:
    validate_hello(HELLO, LAUNCHED)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"rank": 90, "world_size": 91}, "hello.world_size: 91, but this agent launched a world of 2"),
        ({"rank": 0, "world_size": 1}, "hello.world_size: 1"),
        ({"rank": 2}, "hello.rank"),
        ({"local_rank": 2}, "hello.local_rank: 2, but this agent launched 2"),
        ({"pid": 0}, "hello.pid: 0 is not a process this agent launched"),
        ({"pid": os.getpid()}, "hello.pid"),
        ({"pid": 1}, "hello.pid: 1"),
        ({"stack_file": "/etc/shadow"}, "hello.stack_file"),
        ({"stack_file": "/run/stacks/../../etc/shadow"}, "hello.stack_file"),
        ({"node": "n" * 1000}, "hello.node: longer than"),
        ({"restart_count": -1}, "hello.restart_count"),
    ],
    ids=["rank-90-world-91", "world-1", "rank-outside", "local-rank", "pid-0", "agent-pid", "init-pid",
         "stack-file-elsewhere", "stack-file-dot-dot", "long-node", "negative-restarts"],
)  # fmt: skip
def test_a_hello_that_claims_what_the_agent_did_not_launch_is_refused_naming_the_field(
    changes: dict[str, object], names: str
) -> None:
    hello = worker_pb2.Hello()
    hello.CopyFrom(HELLO)
    for name, value in changes.items():
        setattr(hello, name, value)
    with pytest.raises(InvalidMessage, match=names.replace("(", r"\(").replace(")", r"\)")):
        validate_hello(hello, LAUNCHED)


def test_a_heartbeat_is_about_its_own_stream_and_process_and_now() -> None:
    good = telemetry_pb2.Heartbeat(rank=1, pid=4243, wall_time=NOW)
    validate_heartbeat(good, HELLO, LAUNCHED, NOW)
    for bad, names in [
        (telemetry_pb2.Heartbeat(rank=-7, wall_time=NOW), "heartbeat.rank: -7"),
        (telemetry_pb2.Heartbeat(rank=0, wall_time=NOW), "heartbeat.rank: 0"),
        (telemetry_pb2.Heartbeat(rank=1, pid=1, wall_time=NOW), "heartbeat.pid"),
        (telemetry_pb2.Heartbeat(rank=1, wall_time=4e9), "heartbeat.wall_time"),
        (telemetry_pb2.Heartbeat(rank=1, wall_time=float("nan")), "heartbeat.wall_time"),
    ]:
        with pytest.raises(InvalidMessage, match=names):
            validate_heartbeat(bad, HELLO, LAUNCHED, NOW)


@pytest.mark.parametrize(
    ("wall_time", "ok"),
    [(0.0, True), (NOW, True), (NOW + CLOCK_SKEW_SECONDS / 2, True), (STARTED - CLOCK_SKEW_SECONDS / 2, True),
     (4e9, False), (NOW + 2 * CLOCK_SKEW_SECONDS, False), (1.0, False), (float("inf"), False), (-1.0, False)],
)  # fmt: skip
def test_wall_times_from_ranks_are_between_the_agents_start_and_now_give_or_take_a_skew(
    wall_time: float, ok: bool
) -> None:
    report = worker_pb2.ExitReport(rank=1, pid=4243, exit_code=1, wall_time=wall_time)
    checks = [
        lambda: validate_exit_report(report, LAUNCHED, NOW),
        lambda: validate_failure(report, 1, 4243, LAUNCHED, NOW),
        lambda: validate_step_report(telemetry_pb2.StepReport(rank=1, wall_time=wall_time), 1, HELLO, LAUNCHED, NOW),
        lambda: validate_event(telemetry_pb2.Event(kind="x", wall_time=wall_time), 1, LAUNCHED, NOW),
    ]
    for check in checks:
        if ok:
            check()
        else:
            with pytest.raises(InvalidMessage, match="wall_time"):
                check()


def test_an_exit_report_names_a_rank_of_the_world_launched() -> None:
    with pytest.raises(InvalidMessage, match="report.rank: 90 is outside the world"):
        validate_exit_report(worker_pb2.ExitReport(rank=90, pid=5, wall_time=NOW), LAUNCHED, NOW)
    with pytest.raises(InvalidMessage, match="report.rank: 3 is outside"):
        validate_exit_report(worker_pb2.ExitReport(rank=3, pid=5, wall_time=NOW), Launched(), NOW, world_size=2)


def test_a_streams_messages_carry_its_own_rank_and_world() -> None:
    with pytest.raises(InvalidMessage, match="event.rank: 0 does not match"):
        validate_event(telemetry_pb2.Event(kind="x", rank=0), 1)
    with pytest.raises(InvalidMessage, match="step_report.world_size"):
        validate_step_report(telemetry_pb2.StepReport(rank=1, world_size=91), 1, HELLO)
    with pytest.raises(InvalidMessage, match="step_report.collectives"):
        validate_step_report(
            telemetry_pb2.StepReport(rank=1, collectives=[telemetry_pb2.CollectiveTiming()] * 5000), 1, HELLO
        )


def test_event_text_and_detail_strings_are_trimmed_with_a_marker() -> None:
    crash = telemetry_pb2.CrashDetail(log_tail=[f"line {i} " + "x" * 5000 for i in range(500)])
    event = trim_event(telemetry_pb2.Event(kind="crash", text="y" * (1 << 20), crash=crash))
    assert len(event.text.encode()) <= MAX_TEXT_BYTES and event.text.endswith("bytes trimmed]")
    assert len(event.crash.log_tail) < 100 and any("lines trimmed" in line for line in event.crash.log_tail)
    assert event.crash.log_tail[0].startswith("line 0 ") and event.crash.log_tail[-1].startswith("line 499 ")
    assert event.ByteSize() < 128 * 1024
    small = telemetry_pb2.Event(kind="x", text="fine")
    assert trim_event(small).text == "fine"


def test_an_exit_reports_log_tail_is_bounded_keeping_its_first_and_last_lines() -> None:
    report = trim_exit_report(worker_pb2.ExitReport(log_tail=[f"l{i}" for i in range(10_000)]))
    assert len(report.log_tail) == MAX_LOG_LINES + 1
    assert report.log_tail[0] == "l0" and report.log_tail[-1] == "l9999" and "trimmed" in report.log_tail[50]


def test_refusal_texts_are_short() -> None:
    assert len(str(InvalidMessage("x" * 100_000))) <= MAX_ERROR_CHARS
    assert len(str(MergeRefused(grpc.StatusCode.NOT_FOUND, "y" * 100_000))) <= MAX_ERROR_CHARS


# --- signals only to descendants --------------------------------------------------------------------------------


def test_only_descendants_are_signalled(child: subprocess.Popen[bytes]) -> None:
    unrelated = subprocess.Popen(["sleep", "60"], start_new_session=True)  # a child too, but see below
    try:
        assert is_descendant(child.pid)
        assert not is_descendant(os.getpid()) and not is_descendant(os.getppid()) and not is_descendant(1)
        assert not is_descendant(0) and not is_descendant(-1)
        assert not signal_descendant(os.getpid(), signal.SIGUSR1)  # the agent never signals itself
        assert not signal_descendant(os.getppid(), signal.SIGUSR1)
        assert not signal_descendant(999_999_999, signal.SIGKILL)
        assert signal_descendant(unrelated.pid, signal.SIGKILL)
        assert unrelated.wait(10) == -signal.SIGKILL
    finally:
        unrelated.kill()
        unrelated.wait()


async def test_stacks_are_never_asked_of_a_process_that_is_not_the_agents(tmp_path: Path) -> None:
    # The test's parent stands in for "any pid a client names": it must not get SIGUSR1 (it would die of it).
    target = stacks.RankTarget(0, os.getppid(), str(tmp_path / "rank0.txt"))
    self_target = stacks.RankTarget(1, os.getpid(), str(tmp_path / "rank1.txt"))
    dumps = await stacks.collect([target, self_target], timeout=1.0)
    assert [(d.rank, d.text, d.method) for d in dumps] == [(0, None, stacks.NOT_OURS), (1, None, stacks.NOT_OURS)]


# --- a forged time does not wedge supervision -------------------------------------------------------------------


def test_an_exit_time_from_the_future_cannot_keep_an_incident_open() -> None:
    now = [NOW]
    tracker = IncidentTracker(lambda: now[0], hang_timeout=10)
    tracker.rank_attached(0, 11)
    tracker.rank_stepped(0, 5, 0.1)
    tracker.exit_reported(worker_pb2.ExitReport(rank=0, pid=11, exit_code=1, wall_time=4e9), from_guard=True)
    [crash] = [v for v in tracker.tick() if v.event is not None]
    assert crash.event is not None and crash.event.crash.detect_seconds >= 0
    now[0] += 5
    tracker.rank_attached(0, 12)
    now[0] += 1
    [restart] = tracker.rank_stepped(0, 6, 0.1)
    assert restart.event is not None and restart.event.kind == "restart" and tracker.incident is None
    now[0] += 100  # hang detection is on again
    assert [v.action.name for v in tracker.tick()] == ["COLLECT_STACKS"]


# --- bounded history and answers --------------------------------------------------------------------------------


def big_event(i: int) -> telemetry_pb2.Event:
    return telemetry_pb2.Event(kind="x", text=f"{i} " + "z" * 60_000, wall_time=NOW + i)


def test_history_is_bounded_by_bytes_and_no_answer_exceeds_the_budget() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"), HistoryLimits(event_bytes=1 << 20, step_report_bytes=1 << 20))
    for i in range(70):
        state.add_event(big_event(i))
    assert state.history_bytes <= 1 << 20 and state.events[-1].text.startswith("69 ")

    roomy = NodeState(telemetry_pb2.NodeInfo(node="n"))
    for i in range(150):  # ~9 MB of events: more than any one answer may hold
        roomy.add_event(big_event(i))
    snapshot = roomy.snapshot()
    assert snapshot.ByteSize() <= MAX_ANSWER_BYTES and snapshot.events_left_out > 0
    assert snapshot.events[-1].text.startswith("149 ")
    answer = roomy.get_events(0, 0, set())
    assert answer.ByteSize() <= MAX_ANSWER_BYTES and answer.events_left_out == 150 - len(answer.events)
    assert answer.events[-1].text.startswith("149 ")

    sub, lazy = roomy.subscribe(0)
    backfill = list(lazy)
    assert all(batch.ByteSize() <= MAX_ANSWER_BYTES for batch in backfill)
    assert sum(len(batch.events) for batch in backfill) == 150 and len(backfill) >= 3
    for i in range(150, 300):
        roomy.add_event(big_event(i))
    live = roomy.take(sub)
    assert all(batch.ByteSize() <= MAX_ANSWER_BYTES for batch in live) and len(live) >= 3
    assert [int(e.text.split()[0]) for batch in live for e in batch.events] == list(range(150, 300))
    assert [len(batch.events) for batch in roomy.take(sub)] == [0]  # nothing new: one empty batch


def test_a_subscriber_that_does_not_read_holds_a_bounded_backlog() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"), HistoryLimits(pending_events=10, pending_samples=5))
    sub, _ = state.subscribe(0)
    for i in range(100):
        state.event(f"e{i}", kind="x")
        state.add_host_sample(telemetry_pb2.HostSample(wall_time=time.time()))
    assert len(sub.events) == 10 and len(sub.host_samples) == 5 and sub.dropped == 90 + 95


# --- StartMerge with thousands of steps -------------------------------------------------------------------------


def test_a_merge_of_ten_thousand_steps_is_refused_at_once_with_a_short_reason(tmp_path: Path) -> None:
    start = time.monotonic()
    with pytest.raises(MergeRefused) as refused:
        plan_merge(agent_pb2.StartMergeRequest(method="sma", steps=range(1, 10_001)), tmp_path)
    assert time.monotonic() - start < 1.0
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert f"steps: at most {MAX_MERGE_INPUTS}" in str(refused.value) and len(str(refused.value)) < 200
    with pytest.raises(MergeRefused, match="last: at most"):
        plan_merge(agent_pb2.StartMergeRequest(method="sma", last=1_000_000), tmp_path)


def test_a_thousand_steps_with_repeats_are_checked_in_linear_time_and_named_briefly(tmp_path: Path) -> None:
    steps = [*range(1, MAX_MERGE_INPUTS), 5]
    start = time.monotonic()
    with pytest.raises(MergeRefused, match="steps: 5 listed more than once"):
        plan_merge(agent_pb2.StartMergeRequest(method="sma", steps=steps), tmp_path)
    assert time.monotonic() - start < 1.0


def test_a_merge_of_many_missing_steps_says_so_in_under_a_kilobyte(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(MergeRefused) as refused:
        plan_merge(agent_pb2.StartMergeRequest(method="sma", steps=range(1_000_000, 1_001_000)), tmp_path / "ckpt")
    assert refused.value.code == grpc.StatusCode.NOT_FOUND and len(str(refused.value)) <= MAX_ERROR_CHARS


def test_an_exit_report_about_a_live_process_or_another_than_the_ranks_own_opens_no_incident() -> None:
    with pytest.raises(InvalidMessage, match="report.pid: process 4243 is still running"):
        validate_exit_report(
            worker_pb2.ExitReport(rank=1, pid=4243, wall_time=NOW), Launched(running=OURS.__contains__), NOW
        )
    tracker = IncidentTracker(lambda: NOW, hang_timeout=10)
    tracker.rank_attached(0, 11)
    tracker.exit_reported(worker_pb2.ExitReport(rank=0, pid=99, exit_code=1, wall_time=NOW), from_guard=True)
    assert tracker.incident is None and tracker.tick() == []


def test_a_hello_must_name_the_rank_its_process_was_launched_as() -> None:
    launched = Launched(rank_of={4243: (1, 2), 4242: (0, 2)}.get)
    validate_hello(HELLO, launched)
    impostor = worker_pb2.Hello(rank=0, world_size=2, pid=4243)
    with pytest.raises(InvalidMessage, match="process 4243 was launched as rank 1 of 2, not rank 0 of 2"):
        validate_hello(impostor, launched)
    validate_hello(worker_pb2.Hello(rank=0, world_size=2, pid=77), launched)  # not launched by torch elastic: unknown


async def test_stacks_read_back_are_capped_keeping_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "rank0.txt"
    path.write_bytes(b"old\n" * 10 + b"A" * (1 << 20) + b"\nnewest frame\n")
    text = stacks._read_from(str(path), 40, most=1000)
    assert text.startswith("[... ") and "bytes trimmed]" in text and text.endswith("newest frame\n")
    assert len(text) < 1100


def test_get_events_from_a_time_pages_forward_through_more_than_one_answer_holds() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    for i in range(150):
        state.add_event(big_event(i))
    seen: list[int] = []
    since = NOW - 1
    while True:
        page = state.get_events(since, 0, set())
        assert page.ByteSize() <= MAX_ANSWER_BYTES
        seen += [int(e.text.split()[0]) for e in page.events]
        if not page.events_left_out:
            break
        since = page.events[-1].wall_time
    assert seen == list(range(150))


# --- rank guards and a script's own scalars (issue 13) ----------------------------------------------------------

GUARD_HELLO = worker_pb2.Hello(rank=1, local_rank=1, world_size=2, pid=4243, role=worker_pb2.WORKER_ROLE_GUARD)


def test_a_guards_hello_names_a_known_role_and_no_stack_file() -> None:
    validate_hello(GUARD_HELLO, LAUNCHED)
    with pytest.raises(InvalidMessage, match="hello.role: unknown value 7"):
        validate_hello(worker_pb2.Hello(rank=1, local_rank=1, world_size=2, pid=4243, role=7), LAUNCHED)  # type: ignore[arg-type]
    forged = worker_pb2.Hello()
    forged.CopyFrom(GUARD_HELLO)
    forged.stack_file = "/run/stacks/rank1.txt"
    with pytest.raises(InvalidMessage, match="hello.stack_file: a rank guard has none"):
        validate_hello(forged, LAUNCHED)


@pytest.mark.parametrize(
    ("progress", "field"),
    [
        (worker_pb2.ProcessProgress(output_lines=-1), "progress.output_lines"),
        (worker_pb2.ProcessProgress(output_lines=1 << 60), "progress.output_lines"),
        (worker_pb2.ProcessProgress(cpu_seconds=float("nan")), "progress.cpu_seconds"),
        (worker_pb2.ProcessProgress(cpu_seconds=-0.5), "progress.cpu_seconds"),
        (worker_pb2.ProcessProgress(cpu_seconds=1e300), "progress.cpu_seconds"),
        (worker_pb2.ProcessProgress(restart_count=-1), "progress.restart_count"),
        (worker_pb2.ProcessProgress(wall_time=NOW + 3600), "progress.wall_time"),
    ],
)
def test_a_guards_progress_is_refused_naming_the_field_that_is_not_a_count_or_a_time(
    progress: worker_pb2.ProcessProgress, field: str
) -> None:
    with pytest.raises(InvalidMessage, match=field):
        validate_progress(progress, LAUNCHED, NOW)
    validate_progress(worker_pb2.ProcessProgress(output_lines=10, cpu_seconds=2.5, wall_time=NOW), LAUNCHED, NOW)


def test_a_guards_counters_that_go_back_are_no_progress() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    state.rank_attached(GUARD_HELLO)
    state.rank_progress(GUARD_HELLO, worker_pb2.ProcessProgress(output_lines=10, cpu_seconds=5.0))
    state.rank_progress(GUARD_HELLO, worker_pb2.ProcessProgress(output_lines=3, cpu_seconds=1.0))
    status = state.ranks[1]
    assert (status.output_lines, status.cpu_seconds, status.source) == (10, 5.0, telemetry_pb2.RANK_SOURCE_PROCESS)


def test_a_step_reports_own_scalars_are_trimmed_never_refused() -> None:
    report = telemetry_pb2.StepReport(rank=1, step=3)
    report.scalars.update({f"s{i:03d}": float(i) for i in range(MAX_SCALARS + 10)})
    report.scalars.update({"x" * (MAX_SCALAR_NAME_CHARS + 1): 1.0, "nan": float("nan"), "inf": float("inf")})
    trim_scalars(report)
    assert sorted(report.scalars) == [f"s{i:03d}" for i in range(MAX_SCALARS)]
    assert report.step == 3  # the step itself is kept
