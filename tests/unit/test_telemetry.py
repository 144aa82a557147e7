"""Telemetry never slows the step, survives broken sinks, and writes JSONL (from the proto) and console lines."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from google.protobuf import json_format
from support.wire import step_report

from megascope.engine.runtime.telemetry import (
    CollectiveTiming,
    ConsoleSink,
    Event,
    JsonlSink,
    Signal,
    StepReport,
    Telemetry,
)
from megascope.protos.events import WARNING, make_event
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2

# Every field of a report set (a full breakdown that adds up, MFU, throughput), for round trips.
FULL: dict[str, object] = {
    "loss": 2.5, "lr": 3e-4, "grad_norm": 1.25, "tokens": 4096, "step_seconds": 0.5, "data_wait_seconds": 0.05,
    "forward_seconds": 0.1, "backward_seconds": 0.2, "comm_wait_seconds": 0.1, "optimizer_seconds": 0.03,
    "other_seconds": 0.02, "tokens_per_second": 8192.0, "model_flops": 1.0e12, "mfu": 0.4, "node": "",
    "wall_time": 0.0,
}  # fmt: skip


def _report(step: int = 3, **overrides: object) -> StepReport:
    return step_report(0, step, **{**FULL, **overrides})


class RecordingSink:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.steps: list[StepReport] = []
        self.events: list[Event] = []
        self.signals: list[Signal] = []
        self.closed = False
        self._lock = threading.Lock()

    def write_step(self, report: StepReport) -> None:
        time.sleep(self.delay)
        with self._lock:
            self.steps.append(report)

    def write_event(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

    def write_signal(self, signal: Signal) -> None:
        with self._lock:
            self.signals.append(signal)

    def close(self) -> None:
        self.closed = True


class RaisingSink:
    def write_step(self, report: StepReport) -> None:
        raise RuntimeError("sink is broken")

    def write_event(self, event: Event) -> None:
        raise RuntimeError("sink is broken")

    def close(self) -> None:
        pass


def test_step_never_blocks_on_a_slow_sink_and_counts_what_it_drops() -> None:
    sink = RecordingSink(delay=0.2)
    telemetry = Telemetry([sink], capacity=4)
    reports = [_report(step=i) for i in range(100)]
    started = time.perf_counter()
    for report in reports:
        telemetry.step(report)
    elapsed = time.perf_counter() - started
    telemetry.close()
    assert elapsed < 0.1
    assert telemetry.dropped > 0
    assert len(sink.steps) == 100 - telemetry.dropped
    assert sink.closed


def test_reports_that_are_not_dropped_arrive_in_order() -> None:
    sink = RecordingSink()
    telemetry = Telemetry([sink], capacity=200)
    for i in range(100):
        telemetry.step(_report(step=i))
    telemetry.event(make_event("done", telemetry_pb2.RunDetail(phase=telemetry_pb2.RunDetail.PHASE_FINISHED)))
    telemetry.close()
    assert telemetry.dropped == 0
    assert [r.step for r in sink.steps] == list(range(100))
    assert [e.kind for e in sink.events] == ["finished"]


def test_raising_sink_does_not_stop_delivery_to_other_sinks_and_is_counted() -> None:
    good = RecordingSink()
    telemetry = Telemetry([RaisingSink(), good], capacity=64)
    for i in range(5):
        telemetry.step(_report(step=i))
    telemetry.event(make_event("hello", telemetry_pb2.RunDetail(phase=telemetry_pb2.RunDetail.PHASE_STARTED)))
    telemetry.close()
    assert [r.step for r in good.steps] == list(range(5))
    assert len(good.events) == 1
    assert telemetry.sink_errors == 6


def test_jsonl_sink_writes_one_json_object_per_line_that_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "rank0.jsonl"
    collective = CollectiveTiming(
        name="all_reduce",
        bucket_index=1,
        bytes=1 << 20,
        start_offset_seconds=0.1,
        duration_seconds=0.02,
        blocked_seconds=0.01,
    )
    sink = JsonlSink(path)
    sink.write_step(_report(step=7, loss=1.75, collectives=[collective], mfu=None))
    sink.write_event(make_event("val loss 1.9", kind="validation", severity=WARNING, step=7))
    sink.close()

    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2
    step, event = (json.loads(line) for line in lines)
    assert step["type"] == "step"
    assert step["step"] == 7
    assert step["loss"] == 1.75
    assert step["mfu"] is None
    assert step["collectives"] == [
        {
            "name": "all_reduce",
            "bucket_index": 1,
            "bytes": 1 << 20,
            "start_offset_seconds": 0.1,
            "duration_seconds": 0.02,
            "blocked_seconds": 0.01,
        }
    ]
    assert event["type"] == "event"
    assert event["kind"] == "validation"
    assert event["severity"] == "SEVERITY_WARNING"
    assert event["step"] == 7


def test_jsonl_sink_appends_to_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    for step in (1, 2):
        sink = JsonlSink(path)
        sink.write_step(_report(step=step))
        sink.close()
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2]


def test_console_sink_prints_a_step_line_with_step_and_loss() -> None:
    stream = io.StringIO()
    ConsoleSink(stream=stream).write_step(_report(step=3, loss=2.5))
    line = stream.getvalue()
    assert "step 3 | loss 2.5000" in line
    assert line.endswith("\n")
    assert line.count("\n") == 1


def test_console_sink_prints_only_every_nth_step_unless_it_has_a_validation_loss() -> None:
    stream = io.StringIO()
    sink = ConsoleSink(every=10, stream=stream)
    sink.write_step(_report(step=3))
    assert stream.getvalue() == ""
    sink.write_step(_report(step=3, val_loss=1.5))
    sink.write_step(_report(step=20))
    lines = stream.getvalue().splitlines()
    assert [line.split(" | ")[0] for line in lines] == ["step 3", "step 20"]
    assert "val 1.5000" in lines[0]


def test_a_jsonl_record_is_the_proto_message_with_numbers_as_numbers_and_reads_back(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    report = _report(step=9, tokens=1 << 40, restart_count=0, collectives=[CollectiveTiming(name="allreduce")])
    saved = telemetry_pb2.CheckpointDetail(
        phase=telemetry_pb2.CheckpointDetail.PHASE_SAVED, step=9, bytes=123, block_seconds=0.25
    )
    sink = JsonlSink(path)
    sink.write_step(report)
    sink.write_event(make_event("saved step 9", saved, rank=0, step=9, node="node0"))
    sink.close()

    step, event = (json.loads(line) for line in path.read_text().splitlines())
    assert step["tokens"] == 1 << 40  # an int64 is a number, not the string MessageToDict would write
    assert step["restart_count"] == 0  # a field at its default is written: readers index it
    assert step["val_loss"] is None and step["device_compute_seconds"] is None
    assert event["kind"] == "checkpoint"
    assert event["checkpoint"] == {
        "phase": "PHASE_SAVED", "step": 9, "path": "", "bytes": 123, "block_seconds": 0.25,
        "stage_seconds": 0.0, "write_seconds": 0.0, "total_seconds": 0.0, "error": "", "removed": [],
        "free_bytes": 0,
    }  # fmt: skip
    assert "run" not in event  # of the oneof, only the detail that is set
    for record, message in ((step, report), (event, telemetry_pb2.Event())):
        del record["type"]
        parsed = json_format.ParseDict(record, type(message)())
        if message is report:
            assert parsed == report
        else:
            assert parsed.checkpoint.bytes == 123 and parsed.rank == 0 and parsed.node == "node0"


def test_signals_go_to_the_sinks_that_take_them_after_what_was_queued_before() -> None:
    sink = RecordingSink()
    console = io.StringIO()
    telemetry = Telemetry([ConsoleSink(stream=console), sink], capacity=16)
    telemetry.step(_report(step=1))
    telemetry.signal(worker_pb2.RankFinished(steps=1, param_digest="abc"))
    telemetry.close()
    assert [r.step for r in sink.steps] == [1]
    assert sink.signals == [worker_pb2.RankFinished(steps=1, param_digest="abc")]
    assert telemetry.sink_errors == 0  # the console sink takes no signals and is not asked to


def test_jsonl_sink_writes_signals_under_their_attach_payload_name(tmp_path: Path) -> None:
    path = tmp_path / "rank0.jsonl"
    sink = JsonlSink(path)
    sink.write_signal(worker_pb2.ExitReport(rank=1, exit_code=1, log_tail=["Traceback", "RuntimeError: boom"]))
    sink.write_signal(worker_pb2.CommandAck(command_id="c1", ok=True, message="will save after step 4"))
    sink.close()
    failure, ack = (json.loads(line) for line in path.read_text().splitlines())
    assert failure["type"] == "failure" and failure["log_tail"] == ["Traceback", "RuntimeError: boom"]
    assert ack == {"type": "command_ack", "command_id": "c1", "ok": True, "message": "will save after step 4"}


def test_console_sink_prints_warnings_by_their_short_severity_name() -> None:
    stream = io.StringIO()
    ConsoleSink(stream=stream).write_event(make_event("slow disk", kind="note", severity=WARNING))
    assert stream.getvalue() == "[warning] note: slow disk\n"
