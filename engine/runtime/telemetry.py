"""Step reports and events from a training rank, delivered without ever slowing the step.

The training thread calls :meth:`Telemetry.step` / :meth:`Telemetry.event`, which only put the record on a
bounded queue (``put_nowait``): when the queue is full the record is dropped and counted, never waited
for. A background thread drains the queue into the sinks (a JSONL file per rank, a one-line console log on
rank 0, and later the agent). A sink that raises is counted and skipped; it cannot stop training.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TextIO

Severity = Literal["info", "warning", "error", "critical"]


@dataclass
class CollectiveTiming:
    name: str
    bucket: int
    bytes: int
    start_seconds: float
    """Launch time, measured from the start of the step. The rank's compute before this collective is
    ``start_seconds`` minus the step's ``data_wait_seconds`` (the step first waits for its batch)."""
    duration_seconds: float
    blocked_seconds: float
    """How long the training thread waited on this collective after its own compute was done."""


@dataclass
class StepReport:
    rank: int
    local_rank: int
    world_size: int
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    step_seconds: float
    data_wait_seconds: float
    forward_seconds: float
    backward_seconds: float
    """Backward compute only; waiting for gradient communication is ``comm_wait_seconds``."""
    comm_wait_seconds: float
    optimizer_seconds: float
    other_seconds: float
    """Whatever the named phases do not cover (logging, loop overhead)."""
    tokens_per_second: float
    model_flops: float
    mfu: float | None
    gc_pause_seconds: float = 0.0
    cpu_seconds: float = 0.0
    """CPU time of the whole process (every thread) during the step: telemetry threads included."""
    device_compute_seconds: float | None = None
    """GPU only: forward + backward compute on the device, from CUDA events (None on a CPU)."""
    collectives: list[CollectiveTiming] = field(default_factory=list)
    collectives_issued: int = 0
    val_loss: float | None = None
    restart_count: int = 0
    node: str = ""
    wall_time: float = field(default_factory=time.time)


@dataclass
class Event:
    kind: str
    text: str
    severity: Severity = "info"
    rank: int | None = None
    step: int | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    node: str = ""
    wall_time: float = field(default_factory=time.time)


class Sink(Protocol):
    def write_step(self, report: StepReport) -> None: ...
    def write_event(self, event: Event) -> None: ...
    def close(self) -> None: ...


class JsonlSink:
    """One JSON object per line: ``{"type": "step" | "event", ...}``; readable by ``jq`` and by tests."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the sink's lifetime)

    def write_step(self, report: StepReport) -> None:
        self._write({"type": "step", **asdict(report)})

    def write_event(self, event: Event) -> None:
        self._write({"type": "event", **asdict(event)})

    def _write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """The one-line-per-step log a person watches: ``step N | loss X | ...``."""

    def __init__(self, every: int = 1, stream: TextIO | None = None) -> None:
        self._every = max(1, every)
        self._stream = stream or sys.stdout

    def write_step(self, r: StepReport) -> None:
        if r.step % self._every != 0 and r.val_loss is None:
            return
        parts = [
            f"step {r.step}",
            f"loss {r.loss:.4f}",
            f"lr {r.lr:.2e}",
            f"grad {r.grad_norm:.3f}",
            f"{r.tokens_per_second * r.world_size:,.0f} tok/s",
            f"step {r.step_seconds * 1000:.0f} ms",
            f"data {_percent(r.data_wait_seconds, r.step_seconds)}",
            f"comm {_percent(r.comm_wait_seconds, r.step_seconds)}",
        ]
        if r.mfu is not None:
            parts.append(f"mfu {r.mfu * 100:.1f}%")
        if r.val_loss is not None:
            parts.append(f"val {r.val_loss:.4f}")
        print(" | ".join(parts), file=self._stream, flush=True)

    def write_event(self, event: Event) -> None:
        if event.severity != "info" or event.kind in ("started", "finished", "validation"):
            print(f"[{event.severity}] {event.kind}: {event.text}", file=self._stream, flush=True)

    def close(self) -> None:
        pass


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


class Telemetry:
    """Non-blocking emitter: records go on a bounded queue that a daemon thread drains into the sinks."""

    def __init__(self, sinks: list[Sink], capacity: int = 4096) -> None:
        self._sinks = list(sinks)
        self._queue: queue.Queue[StepReport | Event | None] = queue.Queue(maxsize=capacity)
        self.dropped = 0
        """Records dropped because the queue was full."""
        self.sink_errors = 0
        self._thread = threading.Thread(target=self._drain, name="megascope-telemetry", daemon=True)
        self._thread.start()

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def step(self, report: StepReport) -> None:
        self._offer(report)

    def event(self, event: Event) -> None:
        self._offer(event)

    def _offer(self, record: StepReport | Event) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _drain(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            for sink in self._sinks:
                try:
                    if isinstance(record, StepReport):
                        sink.write_step(record)
                    else:
                        sink.write_event(record)
                except Exception:
                    self.sink_errors += 1

    def close(self, timeout: float = 10.0) -> None:
        """Deliver what is queued (up to ``timeout``), then close the sinks."""
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        self._thread.join(timeout=timeout)
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                self.sink_errors += 1
