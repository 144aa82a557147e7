"""Per-collective timings of DDP's gradient all-reduces, through a communication hook.

DDP calls the hook on the autograd thread the moment a gradient bucket is ready, so the hook's call time is
the bucket's launch time, and the last launch marks the end of backward compute: everything ``backward()``
spends after it is the training thread blocked on communication. The completion callback runs on the
process group's thread and stamps each collective's end.

No ``from __future__ import annotations`` here: DDP checks the hook's annotations at runtime and wants
``dist.GradBucket`` itself, not its name as a string.
"""

import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megascope.engine.telemetry import CollectiveTiming


@dataclass
class _Record:
    bucket: int
    bytes: int
    launched: float
    done: float | None = None


class CollectiveTimer:
    """DDP comm hook that all-reduces (averages) each bucket and records when it started and ended."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self._group = group
        self._lock = threading.Lock()
        self._records: list[_Record] = []
        self.issued = 0
        """Collectives issued since the start of training (a progress counter for hang diagnosis)."""

    def hook(self, state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        tensor = bucket.buffer()
        record = _Record(bucket.index(), tensor.numel() * tensor.element_size(), time.perf_counter())
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

    def last_launch(self) -> float | None:
        """perf_counter time of the latest bucket launch in this step, or None if none launched."""
        with self._lock:
            return max((r.launched for r in self._records), default=None)

    def timings(self, step_start: float, compute_end: float) -> list[CollectiveTiming]:
        """This step's collectives; the training thread's wait is attributed to each in completion order."""
        with self._lock:
            records = sorted(self._records, key=lambda r: r.done if r.done is not None else float("inf"))
        timings = []
        waited_until = compute_end
        for r in records:
            done = r.done if r.done is not None else r.launched
            blocked = max(0.0, done - waited_until)
            waited_until = max(waited_until, done)
            timings.append(
                CollectiveTiming(
                    name="allreduce",
                    bucket=r.bucket,
                    bytes=r.bytes,
                    start_seconds=r.launched - step_start,
                    duration_seconds=done - r.launched,
                    blocked_seconds=blocked,
                )
            )
        return timings
