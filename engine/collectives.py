"""Per-collective timings of DDP's gradient all-reduces, through a communication hook.

DDP calls the hook on the autograd thread the moment a gradient bucket is ready, so the hook's call time is
the bucket's launch time, and the last launch marks the end of backward compute: everything ``backward()``
spends after it is the training thread blocked on communication. The completion callback runs on the
process group's thread and stamps each collective's end.

The compute a rank did before each collective is ``start_offset_seconds`` minus the step's data wait (the launch is
measured from the start of the step, and the step waits for its batch before computing), so the per-collective
timings also say how far into its compute each bucket became ready.

On a GPU the host clock only says when kernels were queued, so :class:`DeviceComputeTimer` also measures the
device's own compute with CUDA events: from the forward pass's first kernel to the moment the last gradient
bucket is ready on the device (an event the hook records). Nothing here touches CUDA on a CPU run.

No ``from __future__ import annotations`` here: DDP checks the hook's annotations at runtime and wants
``dist.GradBucket`` itself, not its name as a string.
"""

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megascope.engine.runtime.telemetry import CollectiveTiming


@dataclass
class _Record:
    bucket: int
    bytes: int
    launched: float
    done: float | None = None
    ready_event: torch.cuda.Event | None = None
    """CUDA only: recorded on the compute stream when the bucket's gradients are ready."""


class CollectiveTimer:
    """DDP comm hook that all-reduces (averages) each bucket and records when it started and ended."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self._group = group
        self._lock = threading.Lock()
        self._records: list[_Record] = []
        self.issued = 0
        """Collectives issued since the start of training (a progress counter for hang diagnosis)."""
        self.before_last_launch: Callable[[], None] | None = None
        """Called on the autograd thread just before the step's last bucket launches, that is when this rank's
        backward compute is done (fault injection uses it: a delay here is compute the other ranks wait for)."""

    def hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        tensor = bucket.buffer()
        if self.before_last_launch is not None and bucket.is_last():
            self.before_last_launch()
        record = _Record(bucket.index(), tensor.numel() * tensor.element_size(), time.perf_counter())
        if tensor.is_cuda:
            record.ready_event = torch.cuda.Event(enable_timing=True)
            record.ready_event.record()
        with self._lock:
            self._records.append(record)
            self.issued += 1
        world = dist.get_world_size(self._group)
        tensor.div_(world)
        future = dist.all_reduce(tensor, group=self._group, async_op=True).get_future()  # type: ignore[union-attr]

        def finished(fut: torch.futures.Future[list[torch.Tensor]]) -> torch.Tensor:
            record.done = time.perf_counter()
            return fut.value()[0]

        return future.then(finished)

    def begin_step(self) -> None:
        with self._lock:
            self._records = []

    def take(self) -> list[_Record]:
        """The records since the last call (or ``begin_step``), and a fresh list for the next step: for a caller
        that turns them into timings later, on another thread (:func:`collective_timings`)."""
        with self._lock:
            records, self._records = self._records, []
        return records

    def last_launch(self) -> float | None:
        """perf_counter time of the latest bucket launch in this step, or None if none launched."""
        with self._lock:
            return max((r.launched for r in self._records), default=None)

    def last_ready_event(self) -> torch.cuda.Event | None:
        """CUDA only: the event recorded when this step's last bucket was ready, or None."""
        with self._lock:
            latest = max(self._records, key=lambda r: r.launched, default=None)
        return latest.ready_event if latest is not None else None

    def timings(self, step_start: float, compute_end: float) -> list[CollectiveTiming]:
        """This step's collectives; the training thread's wait is attributed to each in completion order."""
        with self._lock:
            records = list(self._records)
        return collective_timings(records, step_start, compute_end)


def collective_timings(records: list[_Record], step_start: float, compute_end: float) -> list[CollectiveTiming]:
    """The timings of ``records``; the training thread's wait after ``compute_end`` is attributed to each in
    completion order."""
    records = sorted(records, key=lambda r: r.done if r.done is not None else float("inf"))
    timings = []
    waited_until = compute_end
    for r in records:
        done = r.done if r.done is not None else r.launched
        blocked = max(0.0, done - waited_until)
        waited_until = max(waited_until, done)
        timings.append(
            CollectiveTiming(
                name="allreduce",
                bucket_index=r.bucket,
                bytes=r.bytes,
                start_offset_seconds=r.launched - step_start,
                duration_seconds=done - r.launched,
                blocked_seconds=blocked,
            )
        )
    return timings


class DeviceComputeTimer:
    """Device compute time of one step from CUDA events (create it only on a CUDA device).

    ``start`` before each micro-batch's forward, ``stop`` after its backward (with the last bucket's ready event
    on the micro-batch that all-reduces, so waiting for communication is left out). ``seconds`` reads the events
    once the step's host code has waited for the device anyway (the loss ``.item()``), so it adds no sync.
    """

    def __init__(self) -> None:
        self._spans: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._start: torch.cuda.Event | None = None

    def start(self) -> None:
        self._start = torch.cuda.Event(enable_timing=True)
        self._start.record()

    def stop(self, ready: torch.cuda.Event | None = None) -> None:
        assert self._start is not None, "stop() without start()"
        if ready is None:
            ready = torch.cuda.Event(enable_timing=True)
            ready.record()
        self._spans.append((self._start, ready))
        self._start = None

    def seconds(self) -> float:
        """Total device compute of the spans since the last call, in seconds; the events must be complete."""
        total = sum(start.elapsed_time(end) for start, end in self._spans) / 1000.0  # elapsed_time is in ms
        self._spans = []
        return total
