"""Telemetry never slows the step, survives broken sinks, and writes JSONL and console lines."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path

from megascope.engine.runtime.telemetry import (
    CollectiveTiming,
    ConsoleSink,
    Event,
    JsonlSink,
    StepReport,
    Telemetry,
)


def _report(step: int = 3, **overrides: object) -> StepReport:
    values: dict[str, object] = {
        "rank": 0,
        "local_rank": 0,
        "world_size": 2,
        "step": step,
        "loss": 2.5,
        "lr": 3e-4,
        "grad_norm": 1.25,
        "tokens": 4096,
        "step_seconds": 0.5,
        "data_wait_seconds": 0.05,
        "forward_seconds": 0.1,
        "backward_seconds": 0.2,
        "comm_wait_seconds": 0.1,
        "optimizer_seconds": 0.03,
        "other_seconds": 0.02,
        "tokens_per_second": 8192.0,
        "model_flops": 1.0e12,
        "mfu": 0.4,
    }
    values.update(overrides)
    return StepReport(**values)  # type: ignore[arg-type]


class RecordingSink:
    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.steps: list[StepReport] = []
        self.events: list[Event] = []
        self.closed = False
        self._lock = threading.Lock()

    def write_step(self, report: StepReport) -> None:
        time.sleep(self.delay)
        with self._lock:
            self.steps.append(report)

    def write_event(self, event: Event) -> None:
        with self._lock:
            self.events.append(event)

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
    telemetry.event(Event(kind="finished", text="done"))
    telemetry.close()
    assert telemetry.dropped == 0
    assert [r.step for r in sink.steps] == list(range(100))
    assert [e.kind for e in sink.events] == ["finished"]


def test_raising_sink_does_not_stop_delivery_to_other_sinks_and_is_counted() -> None:
    good = RecordingSink()
    telemetry = Telemetry([RaisingSink(), good], capacity=64)
    for i in range(5):
        telemetry.step(_report(step=i))
    telemetry.event(Event(kind="started", text="hello"))
    telemetry.close()
    assert [r.step for r in good.steps] == list(range(5))
    assert len(good.events) == 1
    assert telemetry.sink_errors == 6


def test_jsonl_sink_writes_one_json_object_per_line_that_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "rank0.jsonl"
    collective = CollectiveTiming(
        name="all_reduce",
        bucket=1,
        bytes=1 << 20,
        start_seconds=0.1,
        duration_seconds=0.02,
        blocked_seconds=0.01,
    )
    sink = JsonlSink(path)
    sink.write_step(_report(step=7, loss=1.75, collectives=[collective], mfu=None))
    sink.write_event(Event(kind="validation", text="val loss 1.9", severity="warning", step=7))
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
            "bucket": 1,
            "bytes": 1 << 20,
            "start_seconds": 0.1,
            "duration_seconds": 0.02,
            "blocked_seconds": 0.01,
        }
    ]
    assert event["type"] == "event"
    assert event["kind"] == "validation"
    assert event["severity"] == "warning"
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
