"""A rank's output tail: what its guard sends (engine/runtime/rank_guard.py), how the agent checks it
(agent/validation.py) and keeps it (agent/rank_log.py, NodeState), what GetRankLog answers."""

from __future__ import annotations

import collections
import io

import pytest

from megascope.agent import validation
from megascope.agent.rank_log import RankLog, RankLogLimits
from megascope.agent.state import NodeState
from megascope.agent.validation import InvalidMessage
from megascope.engine.runtime import rank_guard
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

OUT, ERR, AGENT = telemetry_pb2.LOG_STREAM_STDOUT, telemetry_pb2.LOG_STREAM_STDERR, telemetry_pb2.LOG_STREAM_AGENT


def guard_hello(pid: int = 4243, restart_count: int = 0) -> worker_pb2.Hello:
    return worker_pb2.Hello(
        rank=1, local_rank=1, world_size=2, pid=pid, restart_count=restart_count, role=worker_pb2.WORKER_ROLE_GUARD
    )


def progress(*texts: str, dropped: int = 0, stream: int = OUT) -> worker_pb2.ProcessProgress:
    lines = [telemetry_pb2.LogLine(text=text, stream=stream) for text in texts]  # type: ignore[arg-type]
    return worker_pb2.ProcessProgress(output_lines=len(texts), lines=lines, lines_dropped=dropped)


def texts(answer: agent_pb2.GetRankLogResponse) -> list[str]:
    return [line.text for line in answer.lines]


# -- the agent's log of a rank ----------------------------------------------------------------------------------


def test_the_agent_keeps_a_ranks_lines_in_order_after_a_marker_for_its_process() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    state.rank_attached(guard_hello())
    state.rank_progress(guard_hello(), progress("hello", "loss 2.3"))
    state.rank_progress(guard_hello(), progress("Traceback", stream=ERR))
    answer = state.rank_log(1, 100)
    assert answer is not None
    assert texts(answer) == ["--- rank 1: process 4243 started, attempt 0 ---", "hello", "loss 2.3", "Traceback"]
    assert [line.stream for line in answer.lines] == [AGENT, OUT, OUT, ERR]
    assert [line.seq for line in answer.lines] == [1, 2, 3, 4]
    assert (answer.pid, answer.lines_left_out, answer.lines_dropped) == (4243, 0, 0)


def test_a_new_process_of_the_rank_starts_with_a_restart_marker() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    state.rank_attached(guard_hello(pid=4243))
    state.rank_progress(guard_hello(pid=4243), progress("first attempt"))
    state.rank_attached(guard_hello(pid=5000, restart_count=1))
    state.rank_progress(guard_hello(pid=5000, restart_count=1), progress("second attempt"))
    answer = state.rank_log(1, 100)
    assert answer is not None
    assert texts(answer)[1:] == [
        "first attempt",
        "--- rank 1: process 5000 restarted (the previous one was pid 4243), attempt 1 ---",
        "second attempt",
    ]
    assert (answer.pid, answer.restart_count) == (5000, 1)


def test_the_rank_attaching_itself_after_its_guard_adds_no_marker() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    state.rank_attached(guard_hello())
    state.rank_attached(worker_pb2.Hello(rank=1, local_rank=1, world_size=2, pid=4243))  # the same process
    answer = state.rank_log(1, 100)
    assert answer is not None and len(answer.lines) == 1


def test_lines_from_a_guard_that_was_replaced_are_ignored() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    state.rank_attached(guard_hello(pid=4243))
    state.rank_attached(guard_hello(pid=5000, restart_count=1))
    state.rank_progress(guard_hello(pid=4243), progress("late line of the old process"))
    answer = state.rank_log(1, 100)
    assert answer is not None and "late line of the old process" not in texts(answer)


def test_the_last_lines_after_the_rank_failed_are_kept() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    state.rank_attached(guard_hello())
    state.rank_exited(worker_pb2.ExitReport(rank=1, pid=4243, exit_code=1))  # the guard reports the exit first
    state.rank_progress(guard_hello(), progress("ValueError: boom", stream=ERR))
    answer = state.rank_log(1, 100)
    assert answer is not None and texts(answer)[-1] == "ValueError: boom"


def test_lines_the_guard_could_not_send_are_counted_and_marked() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    state.rank_attached(guard_hello())
    state.rank_progress(guard_hello(), progress("after the flood", dropped=40))
    answer = state.rank_log(1, 100)
    assert answer is not None
    assert texts(answer)[1:] == [
        "--- 40 lines not received: the rank wrote them faster than its guard sends them ---",
        "after the flood",
    ]
    assert answer.lines_dropped == 40


def test_the_log_is_bounded_by_lines_and_counts_what_it_pushed_out() -> None:
    log = RankLog(1, RankLogLimits(lines=5, bytes=1 << 20))
    log.add([telemetry_pb2.LogLine(text=f"line {i}", stream=OUT) for i in range(12)], 0)
    answer = log.answer(100, 1 << 20)
    assert texts(answer) == [f"line {i}" for i in range(7, 12)]
    assert [line.seq for line in answer.lines] == [8, 9, 10, 11, 12]  # numbers go on: a reader sees the gap
    assert answer.lines_dropped == 7


def test_the_log_is_bounded_by_bytes() -> None:
    log = RankLog(1, RankLogLimits(lines=1000, bytes=10_000))
    log.add([telemetry_pb2.LogLine(text="x" * 1000, stream=OUT) for _ in range(50)], 0)
    assert log.bytes <= 10_000
    assert len(log.lines) == 9 and log.dropped == 41


def test_an_answer_holds_the_newest_lines_asked_for_and_under_its_byte_budget() -> None:
    log = RankLog(1)
    log.add([telemetry_pb2.LogLine(text=f"{i:04d}" + "x" * 96, stream=OUT) for i in range(100)], 0)
    newest = log.answer(10, 1 << 20)
    assert [t[:4] for t in texts(newest)] == [f"{i:04d}" for i in range(90, 100)]
    assert newest.lines_left_out == 90
    small = log.answer(100, 1000)
    assert 0 < len(small.lines) < 10 and texts(small)[-1].startswith("0099") and small.ByteSize() < 1200


def test_a_rank_not_on_the_node_has_no_log() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="n"))
    state.rank_attached(guard_hello())
    assert state.rank_log(0, 100) is None


# -- the lines on the wire ------------------------------------------------------------------------------------


def test_a_progress_with_lines_in_bounds_is_valid() -> None:
    validation.validate_progress(progress(*(["x"] * validation.MAX_PROGRESS_LINES), dropped=3))


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (progress(*(["x"] * (validation.MAX_PROGRESS_LINES + 1))), "progress.lines: at most 256"),
        (progress("x", dropped=-1), "progress.lines_dropped"),
        (progress("x", stream=telemetry_pb2.LOG_STREAM_UNSPECIFIED), r"progress.lines\[0\].stream"),
        (progress("x", stream=AGENT), r"progress.lines\[0\].stream"),
    ],
)
def test_a_progress_with_bad_lines_is_refused_naming_the_field(message: worker_pb2.ProcessProgress, field: str) -> None:
    with pytest.raises(InvalidMessage, match=field):
        validation.validate_progress(message)


def test_an_overlong_line_from_the_wire_is_cut_and_marked_never_refused() -> None:
    trimmed = validation.trim_progress_lines(progress("y" * 5000))
    assert len(trimmed[0].text.encode()) <= validation.MAX_LINE_BYTES
    assert trimmed[0].text.endswith("bytes trimmed]")


def test_get_rank_log_checks_the_rank_and_caps_the_lines() -> None:
    assert validation.rank_log_lines(agent_pb2.GetRankLogRequest(rank=1), 2) == validation.DEFAULT_RANK_LOG_LINES
    assert validation.rank_log_lines(agent_pb2.GetRankLogRequest(rank=1, max_lines=7), 2) == 7
    with pytest.raises(InvalidMessage, match="rank: must be >= 0"):
        validation.rank_log_lines(agent_pb2.GetRankLogRequest(rank=-1), 2)
    with pytest.raises(InvalidMessage, match="rank: the job has ranks 0 to 1, got 2"):
        validation.rank_log_lines(agent_pb2.GetRankLogRequest(rank=2), 2)
    with pytest.raises(InvalidMessage, match="max_lines: must be in"):
        validation.rank_log_lines(agent_pb2.GetRankLogRequest(rank=0, max_lines=validation.MAX_RANK_LOG_LINES + 1), 2)


# -- the guard's side --------------------------------------------------------------------------------------------


def test_the_guard_sends_no_more_than_the_agent_accepts() -> None:
    assert rank_guard.LINES_PER_PROGRESS <= validation.MAX_PROGRESS_LINES
    assert rank_guard.LINE_BYTES <= validation.MAX_LINE_BYTES


def test_the_guard_cuts_a_long_line_to_its_limit_and_marks_it() -> None:
    cut = rank_guard.cut_line("é" * 2000)
    assert len(cut.encode()) <= rank_guard.LINE_BYTES
    assert cut.endswith(" [cut: 4000 bytes]")
    assert rank_guard.cut_line("short") == "short"


def test_the_guard_keeps_the_newest_lines_and_counts_the_ones_the_agent_missed() -> None:
    outbox: collections.deque[tuple[int, int, str]] = collections.deque(maxlen=rank_guard.LINES_PER_PROGRESS)
    out = rank_guard._Stream(OUT, outbox)
    err = rank_guard._Stream(ERR, outbox)
    lines = rank_guard._Lines(outbox)
    copied = io.BytesIO()
    rank_guard._copy(io.BytesIO(b"".join(b"line %d\n" % i for i in range(300))), copied, out)
    rank_guard._copy(io.BytesIO(b"oops\n"), io.BytesIO(), err)
    assert copied.getvalue().count(b"\n") == 300  # the rank's output itself is copied whole
    sent, lost = lines.take()
    assert lost == 300 + 1 - rank_guard.LINES_PER_PROGRESS
    assert [(line.text, line.stream) for line in sent[-2:]] == [("line 299", OUT), ("oops", ERR)]
    rank_guard._copy(io.BytesIO(b"next\n"), io.BytesIO(), out)
    sent, lost = lines.take()
    assert ([line.text for line in sent], lost) == (["next"], 0)
