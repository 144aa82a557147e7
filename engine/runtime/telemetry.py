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

import collections
import json
import sys
import threading
import time
from collections.abc import Callable
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

POLL_SECONDS = 0.02
"""How often the drain thread looks at a queue nobody woke it for (step reports: see :class:`Telemetry`)."""
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
    """The one-line-per-step log a person watches: ``step N | loss X | ...``, and a line for each thing that
    changes what is on disk or where training starts from (saved, removed by retention, resumed, initialized
    from another checkpoint), so the console alone tells what a run did."""

    _SHOWN_INFO = frozenset(
        {"started", "finished", "validation", "checkpoint", "checkpoint_cleanup", "checkpoint_refused",
         "resumed", "initialized", "restart_from_missing"}
    )  # fmt: skip
    """Info events worth a console line; warnings and errors are always shown."""

    def __init__(self, every: int = 1, stream: TextIO | None = None) -> None:
        self._every = max(1, every)
        self._stream = stream or sys.stdout
        self._resumed_at = 0
        """The step this start resumed from (0: from scratch): a resumed run trains only the steps after it."""

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
        if event.WhichOneof("detail") == "resume" and event.resume.source == event.resume.SOURCE_RESUME:
            self._resumed_at = event.resume.step
        if event.severity != Event.SEVERITY_INFO or event.kind in self._SHOWN_INFO:
            text = self._finished_text(event) if event.kind == "finished" else event.text
            print(f"[{_SEVERITY_NAMES[event.severity]}] {event.kind}: {text}", file=self._stream, flush=True)

    def _finished_text(self, event: Event) -> str:
        """The steps this start ran, "trained N steps (A..B)", not the step it ended at: a resumed run starts past
        step 1, and "trained 400 steps" of a run that resumed at 200 misleads."""
        last = event.run.steps if event.WhichOneof("detail") == "run" else event.step
        first = self._resumed_at + 1
        if last < first:
            return f"nothing to train: resumed at step {self._resumed_at}, the run's last (raise --steps to go on)"
        trained = last - self._resumed_at
        resumed = f", resumed at step {self._resumed_at}" if self._resumed_at else ""
        return f"trained {trained} step{'s' if trained != 1 else ''} ({first}..{last}{resumed})"

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


_STEP, _EVENT, _SIGNAL, _DEFERRED_STEP = range(4)
"""What a queued record is: the drain thread hands each kind to a different sink method (a deferred step is
built first)."""


class Telemetry:
    """Non-blocking emitter: records go on a bounded queue that a daemon thread drains into the sinks.

    The queue is a deque the training thread appends to without waking the drain thread (waking a thread is a
    system call, a few microseconds on a VM: more than the rest of a step's telemetry); the drain thread looks every
    :data:`POLL_SECONDS`. Events, signals and ``close`` wake it at once.
    """

    def __init__(self, sinks: list[Sink], capacity: int = 4096) -> None:
        self._sinks = list(sinks)
        self._records: collections.deque[tuple[int, Any] | None] = collections.deque()
        self._capacity = capacity
        self._wake = threading.Event()
        self.dropped = 0
        """Records dropped because the queue was full."""
        self.sink_errors = 0
        """Records a sink failed to take, and step reports that could not be built."""
        self._thread = threading.Thread(target=self._drain, name="megascope-telemetry", daemon=True)
        self._thread.start()

    def add_sink(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def step(self, report: StepReport) -> None:
        self._offer((_STEP, report))

    def deferred_step(self, build: Callable[..., StepReport | None], args: tuple[Any, ...]) -> None:
        """Queue a step report that ``build(*args)`` makes on the drain thread (None: nothing to send).

        For the public API's ``step()``: building the message costs the training thread more than queueing its
        parts, and reading a tensor there would sync the device."""
        # _offer's code, inlined: on the training thread every call counts (~2 us each there, run cold after the
        # step's work).
        if len(self._records) >= self._capacity:
            self.dropped += 1
            return
        self._records.append((_DEFERRED_STEP, (build, args)))

    def event(self, event: Event) -> None:
        self._offer((_EVENT, event), wake=True)

    def signal(self, signal: Signal) -> None:
        """Queue a lifecycle signal for the agent, behind everything queued before it (see SIGNAL_TIMEOUT_SECONDS)."""
        deadline = time.monotonic() + SIGNAL_TIMEOUT_SECONDS
        while len(self._records) >= self._capacity and time.monotonic() < deadline:
            self._wake.set()
            time.sleep(0.01)
        self._offer((_SIGNAL, signal), wake=True)

    def _offer(self, record: tuple[int, Any], wake: bool = False) -> None:
        # len() and append() of a deque are atomic: no lock. Several threads may pass the check at once and
        # overshoot the capacity by a few records, which is harmless.
        if len(self._records) >= self._capacity:
            self.dropped += 1
            return
        self._records.append(record)
        if wake:
            self._wake.set()

    def _drain(self) -> None:
        records = self._records
        while True:
            if not records:
                self._wake.wait(POLL_SECONDS)
                self._wake.clear()
                continue
            record = records.popleft()
            if record is None:
                return
            kind, message = record
            if kind == _DEFERRED_STEP:
                build, args = message
                try:
                    message = build(*args)
                except Exception:
                    message = None
                if message is None:
                    self.sink_errors += 1
                    continue
                kind = _STEP
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
        self._records.append(None)  # past the capacity if need be: the end must get through
        self._wake.set()
        self._thread.join(timeout=timeout)
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                self.sink_errors += 1
