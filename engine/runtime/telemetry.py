"""Step reports and events from a training rank, delivered without ever slowing the step.

The training thread calls :meth:`Telemetry.step` / :meth:`Telemetry.event`, which only put the record on a
bounded queue (``put_nowait``): when the queue is full the record is dropped and counted, never waited
for. A background thread drains the queue into the sinks (a JSONL file per rank, a one-line console log on
rank 0, and the agent). A sink that raises is counted and skipped; it cannot stop training.

There is one schema: the records are the wire's own messages (``telemetry_pb2.StepReport`` and
``telemetry_pb2.Event``, built with :func:`megascope.protos.events.make_event`), and the JSONL file is written
from them (:func:`message_record`). Lifecycle signals for the agent (the rank finished, failed, its
self-check, a command's answer) go through the same queue, after what was queued before them, so the agent
sees the last step reports before the signal that ends the stream; only the agent's sink reads them.
"""

from __future__ import annotations

import contextlib
import json
import queue
import sys
import threading
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeAlias, runtime_checkable

from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2
from megascope.protos.records import message_record

# The wire's messages, by the names the engine has always used for them (one schema: these are the protos).
StepReport: TypeAlias = telemetry_pb2.StepReport
CollectiveTiming: TypeAlias = telemetry_pb2.CollectiveTiming
Event: TypeAlias = telemetry_pb2.Event

Signal: TypeAlias = worker_pb2.RankFinished | worker_pb2.ExitReport | worker_pb2.SelfCheckResult | worker_pb2.CommandAck
"""A lifecycle message for the agent: sent on the Attach stream as its own payload, never as an event."""

SIGNAL_TIMEOUT_SECONDS = 2.0
"""How long the training thread may wait to queue a signal when the queue is full. Signals are rare (one per
command, one at the end) and the agent acts on them, so they wait briefly rather than being dropped."""


class Sink(Protocol):
    def write_step(self, report: StepReport) -> None: ...
    def write_event(self, event: Event) -> None: ...
    def close(self) -> None: ...


@runtime_checkable
class SignalSink(Sink, Protocol):
    """A sink that also carries lifecycle signals (the agent link)."""

    def write_signal(self, signal: Signal) -> None: ...


_SIGNAL_TYPES = {
    field.message_type.full_name: field.name
    for field in worker_pb2.AttachRequest.DESCRIPTOR.oneofs_by_name["payload"].fields
    if field.name in ("finished", "failure", "self_check", "command_ack")
}
"""A signal's record type in the JSONL file: its payload name on the Attach stream ("finished", "failure", ...)."""


class JsonlSink:
    """One JSON object per line: ``{"type": "step" | "event" | <signal>, ...}`` (:func:`message_record` of the
    message); readable by ``jq``, by tests, and by ``json_format.ParseDict`` once ``type`` is taken out."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (open for the sink's lifetime)

    def write_step(self, report: StepReport) -> None:
        self._write({"type": "step", **message_record(report)})

    def write_event(self, event: Event) -> None:
        self._write({"type": "event", **message_record(event)})

    def write_signal(self, signal: Signal) -> None:
        # Kept in the file too (a failure's traceback, the self-check verdict), typed by its Attach payload name.
        self._write({"type": _SIGNAL_TYPES[signal.DESCRIPTOR.full_name], **message_record(signal)})

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
        if r.step % self._every != 0 and not r.HasField("val_loss"):
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
        if r.HasField("mfu"):
            parts.append(f"mfu {r.mfu * 100:.1f}%")
        if r.HasField("val_loss"):
            parts.append(f"val {r.val_loss:.4f}")
        print(" | ".join(parts), file=self._stream, flush=True)

    def write_event(self, event: Event) -> None:
        if event.severity != Event.SEVERITY_INFO or event.kind in ("started", "finished", "validation"):
            print(f"[{_SEVERITY_NAMES[event.severity]}] {event.kind}: {event.text}", file=self._stream, flush=True)

    def close(self) -> None:
        pass


_SEVERITY_NAMES = {
    Event.SEVERITY_UNSPECIFIED: "info",
    Event.SEVERITY_INFO: "info",
    Event.SEVERITY_WARNING: "warning",
    Event.SEVERITY_ERROR: "error",
    Event.SEVERITY_CRITICAL: "critical",
}


def _percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.0f}%" if whole > 0 else "-"


_STEP, _EVENT, _SIGNAL = range(3)
"""What a queued record is: the drain thread hands each kind to a different sink method."""


class Telemetry:
    """Non-blocking emitter: records go on a bounded queue that a daemon thread drains into the sinks."""

    def __init__(self, sinks: list[Sink], capacity: int = 4096) -> None:
        self._sinks = list(sinks)
        self._queue: queue.Queue[tuple[int, Any] | None] = queue.Queue(maxsize=capacity)
        self.dropped = 0
        """Records dropped because the queue was full."""
        self.sink_errors = 0
        self._thread = threading.Thread(target=self._drain, name="megascope-telemetry", daemon=True)
        self._thread.start()

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def step(self, report: StepReport) -> None:
        self._offer((_STEP, report))

    def event(self, event: Event) -> None:
        self._offer((_EVENT, event))

    def signal(self, signal: Signal) -> None:
        """Queue a lifecycle signal for the agent, behind everything queued before it (see SIGNAL_TIMEOUT_SECONDS)."""
        try:
            self._queue.put((_SIGNAL, signal), timeout=SIGNAL_TIMEOUT_SECONDS)
        except queue.Full:
            self.dropped += 1

    def _offer(self, record: tuple[int, Any]) -> None:
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _drain(self) -> None:
        while True:
            record = self._queue.get()
            if record is None:
                return
            kind, message = record
            for sink in self._sinks:
                try:
                    if kind == _STEP:
                        sink.write_step(message)
                    elif kind == _EVENT:
                        sink.write_event(message)
                    elif isinstance(sink, SignalSink):
                        sink.write_signal(message)
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
