"""Asynchronous sharded saves: the training thread pays for almost nothing.

A save runs as a job on one background thread per rank, in three stages:

1. stage: copy the tensors this rank writes (see plan.py) into a reusable host buffer pool (pinned memory
   on GPU). This runs while the next forward and backward run, which read the weights but do not change
   them; the training thread waits only in :meth:`Checkpointer.before_optimizer_step` if staging is
   still going when the optimizer is about to change them.
2. write: serialise the staged buffers to ``<step>.tmp/rank<R>.safetensors``, fsync. Before that, when the
   disk has less free space than the save needs, rank 0 removes the checkpoints retention would remove after
   it (``checkpoint_made_room``), so that one full disk does not fail every later save.
3. commit: every rank reports what it wrote (or its error) to rank 0 over the checkpoint's own gloo
   process group (never the training group, so it cannot deadlock with gradient all-reduces). Rank 0
   writes ``metadata.json``, fsyncs, renames the directory to its final name, then moves ``latest``.
   Any rank's failure (disk full, unwritable directory), or a failed commit, aborts it: the save is reported
   as failed (a warning), the unfinished directory is removed, ``latest`` is untouched, and training goes on.

At most one save is in flight: a new save waits for the previous one to finish before staging.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from megascope.engine.checkpoint.format import (
    DTYPES,
    LATEST,
    METADATA,
    CheckpointError,
    Metadata,
    Shard,
    TensorMeta,
    committed_steps,
    fsync_dir,
    read_metadata,
    step_dir_name,
    write_atomically,
)
from megascope.engine.checkpoint.plan import Item, plan
from megascope.engine.checkpoint.safetensors_io import write_file
from megascope.engine.runtime.faults import CRASH_POINT_ENV, FaultInjector
from megascope.protos.events import INFO, WARNING, make_event
from megascope.protos.megascope.v1 import telemetry_pb2

__all__ = ["CRASH_POINT_ENV", "Checkpointer", "EventCallback", "SaveFigures", "remove_unfinished"]

EventCallback = Callable[[telemetry_pb2.Event], None]
"""How the checkpointer reports saves: events with a CheckpointDetail (started, saved, failed), from rank 0
(started, saved) or any rank (failed); called on the training thread (started) or the save's thread."""


@dataclass
class SaveFigures:
    step: int
    block_seconds: float = 0.0
    """Training thread blocked: the save call plus any wait before the next optimizer step."""
    stage_seconds: float = 0.0
    write_seconds: float = 0.0
    commit_seconds: float = 0.0
    total_seconds: float = 0.0
    """From the save call to the committed checkpoint (on rank 0; on other ranks, to their part written)."""
    bytes_written: int = 0
    error: str | None = None


@dataclass
class _Job:
    step: int
    items: list[Item]
    extra: dict[str, Any]
    started: float
    figures: SaveFigures
    staged: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)


class Checkpointer:
    def __init__(
        self,
        directory: str | Path,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        layout: str = "ddp",
        keep_last: int = 3,
        keep_every: int = 0,
        on_event: EventCallback | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        """``group``: a gloo group used only for checkpoint coordination (None with one process); ``faults``: the
        rank's injector, asked at each stage of a save (by default one that applies CRASH_POINT_ENV alone)."""
        self.directory = Path(directory)
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.layout = layout
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.on_event = on_event
        self.faults = faults if faults is not None else FaultInjector(rank=rank)
        self.pinned = torch.cuda.is_available()
        self._buffers: dict[str, torch.Tensor] = {}
        self._job: _Job | None = None
        self._wakeup = threading.Condition()
        self._pending: _Job | None = None
        self._closed = False
        self.history: list[SaveFigures] = []
        self._last_total = 0
        """Bytes of the last save this checkpointer committed (rank 0): the next save's estimate."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._work, name="megascope-checkpoint", daemon=True)
        self._thread.start()

    # --- training thread ---------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        state: dict[str, torch.Tensor],
        extra: dict[str, Any] | None = None,
        local: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Start saving ``state`` as step ``step``; returns once the job is queued (after any previous save).

        ``state`` must hold the same names on every rank (plain tensors are replicated, DTensors sharded);
        ``local`` holds this rank's own tensors; ``extra`` (JSON) is stored by rank 0.
        """
        start = time.perf_counter()
        self.wait()  # at most one save in flight
        # Refuse what the background thread could not write, here, where the caller sees the error.
        for name, tensor in (*state.items(), *(local or {}).items()):
            if tensor.dtype not in DTYPES:
                raise CheckpointError(f"{name}: dtype {tensor.dtype} cannot be saved (supported: {list(DTYPES)})")
        try:
            json.dumps(extra or {})
        except (TypeError, ValueError) as error:
            raise CheckpointError(f"extra: must be JSON-serialisable ({error})") from None
        figures = SaveFigures(step=step)
        job = _Job(step, plan(state, self.rank, self.world_size, local), extra or {}, start, figures)
        with self._wakeup:
            self._job = self._pending = job
            self._wakeup.notify()
        if self.rank == 0:
            self._event(f"saving step {step}", telemetry_pb2.CheckpointDetail.PHASE_STARTED, step)
        figures.block_seconds += time.perf_counter() - start

    def before_optimizer_step(self) -> None:
        """Wait until the in-flight save has copied the weights; call right before ``optimizer.step()``."""
        job = self._job
        if job is not None and not job.staged.is_set():
            start = time.perf_counter()
            job.staged.wait()
            job.figures.block_seconds += time.perf_counter() - start

    def wait(self) -> SaveFigures | None:
        """Wait for the in-flight save to finish (committed or failed); its figures."""
        job = self._job
        if job is None:
            return None
        job.done.wait()
        return job.figures

    def close(self) -> None:
        self.wait()
        with self._wakeup:
            self._closed = True
            self._wakeup.notify()
        self._thread.join(timeout=10)

    # --- background thread ----------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            with self._wakeup:
                while self._pending is None and not self._closed:
                    self._wakeup.wait()
                if self._pending is None:
                    return
                job, self._pending = self._pending, None
            try:
                self._run(job)
            except Exception as error:  # whatever it is, this save failed; the next one must still work
                job.figures.error = f"step {job.step} not saved: {type(error).__name__}: {error}"
                if self.rank == 0:  # nothing of a failed save stays behind
                    shutil.rmtree(self.directory / (step_dir_name(job.step) + ".tmp"), ignore_errors=True)
                self._failed(job.step, job.figures.error)
            finally:
                job.staged.set()
                job.done.set()
                self.history.append(job.figures)

    def _run(self, job: _Job) -> None:
        figures = job.figures
        t0 = time.perf_counter()
        self.faults.at_checkpoint("stage", job.step)
        staged = {item.name: self._stage(item) for item in job.items}
        job.staged.set()
        t1 = time.perf_counter()
        figures.stage_seconds = t1 - t0
        tmp = self.directory / (step_dir_name(job.step) + ".tmp")
        report: dict[str, Any]
        if self.rank == 0:
            with contextlib.suppress(OSError, CheckpointError):  # best effort: the write itself says if it fails
                self._make_room(job)
        try:
            tmp.mkdir(parents=True, exist_ok=True)
            self.faults.at_checkpoint("write", job.step)
            file = f"rank{self.rank}.safetensors"
            result = write_file(tmp / file, staged, {"step": str(job.step), "rank": str(self.rank)}) if staged else None
            written = result.tensors if result is not None else {}
            size = (tmp / file).stat().st_size if staged else 0
            shards = [
                (item.name, item.global_shape, DTYPES[item.data.dtype],
                 Shard(file, item.name, item.offset, item.rows, w.byte_start, w.byte_end, w.crc32))
                for item, w in ((item, written[item.name]) for item in job.items)
            ]  # fmt: skip
            report = {"rank": self.rank, "file": file if staged else None, "size": size, "shards": shards,
                      "header_crc32": result.header_crc32 if result is not None else None}  # fmt: skip
            figures.bytes_written = size
        except OSError as error:
            report = {"rank": self.rank, "error": f"rank {self.rank} could not write {tmp}: {error}"}
        t2 = time.perf_counter()
        figures.write_seconds = t2 - t1
        reports = self._gather(report)
        self.faults.at_checkpoint("before_commit", job.step)
        if self.rank == 0:
            assert reports is not None
            self._commit(job, tmp, reports)
        figures.commit_seconds = time.perf_counter() - t2
        figures.total_seconds = time.perf_counter() - job.started

    def _stage(self, item: Item) -> torch.Tensor:
        # Reuse the buffer of the previous save when the shape matches: no allocation on the hot path.
        buffer = self._buffers.get(item.name)
        source = item.data.detach()
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=self.pinned)
            self._buffers[item.name] = buffer
        buffer.copy_(source, non_blocking=False)
        return buffer

    def _gather(self, report: dict[str, Any]) -> list[dict[str, Any]] | None:
        if self.group is None or self.world_size == 1:
            return [report]
        reports: list[dict[str, Any]] | None = [{} for _ in range(self.world_size)] if self.rank == 0 else None
        dist.gather_object(report, reports, dst=0, group=self.group)
        return reports

    def _commit(self, job: _Job, tmp: Path, reports: list[dict[str, Any]]) -> None:
        figures = job.figures
        errors = [r["error"] for r in reports if "error" in r]
        if errors:
            figures.error = "; ".join(errors)
            shutil.rmtree(tmp, ignore_errors=True)
            self._failed(job.step, f"step {job.step} not saved: {figures.error}")
            return
        tensors: dict[str, TensorMeta] = {}
        for report in reports:
            for name, shape, dtype, shard in report["shards"]:
                tensors.setdefault(name, TensorMeta(shape, dtype, [])).shards.append(shard)
        for meta in tensors.values():
            meta.shards.sort(key=lambda s: s.offset)
        metadata = Metadata(
            step=job.step,
            world_size=self.world_size,
            layout=self.layout,
            tensors=dict(sorted(tensors.items())),
            files={r["file"]: r["size"] for r in reports if r["file"]},
            extra=job.extra,
            headers={r["file"]: r["header_crc32"] for r in reports if r["file"]},
            created=time.time(),
        )
        final = self.directory / step_dir_name(job.step)
        try:
            for stale in tmp.iterdir():  # files a crashed earlier attempt left behind
                if stale.name not in metadata.files:
                    stale.unlink()
            write_atomically(tmp / METADATA, metadata.to_json())
            self.faults.at_checkpoint("commit", job.step)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            fsync_dir(self.directory)
            self.faults.at_checkpoint("publish", job.step)
            write_atomically(self.directory / LATEST, final.name + "\n")
        except OSError as error:
            figures.error = f"commit of step {job.step} failed: {error}"
            shutil.rmtree(tmp, ignore_errors=True)  # a failed commit leaves nothing behind (it may be a full disk)
            self._failed(job.step, figures.error)
            return
        self._last_total = metadata.total_bytes
        removed = self._retain()
        seconds = time.perf_counter() - job.started
        # Retention deletes checkpoints a person may want (to verify, merge or resume from): say which.
        retention = ""
        if removed:
            every = f" and every multiple of {self.keep_every}" if self.keep_every else ""
            retention = f"; removed {', '.join(map(step_dir_name, removed))} (keeps the newest {self.keep_last}{every})"
        self._event(
            f"saved step {job.step}: {metadata.total_bytes / 1e6:.1f} MB in {seconds:.2f}s "
            f"(training blocked {figures.block_seconds * 1e3:.1f} ms){retention}",
            telemetry_pb2.CheckpointDetail.PHASE_SAVED,
            job.step,
            removed=removed,
            path=str(final),
            bytes=metadata.total_bytes,
            block_seconds=figures.block_seconds,
            stage_seconds=figures.stage_seconds,
            write_seconds=figures.write_seconds,
            total_seconds=seconds,
        )

    def _beyond_keep(self, steps: list[int]) -> list[int]:
        """Of ``steps`` (committed, oldest first), those the keep rules do not keep, oldest first."""
        keep = set(steps[-self.keep_last :]) if self.keep_last > 0 else set(steps)
        if self.keep_every > 0:
            keep |= {s for s in steps if s % self.keep_every == 0}
        return [s for s in steps if s not in keep]

    def _retain(self) -> list[int]:
        """Remove the committed steps the keep rules do not keep; the steps removed."""
        removed = self._beyond_keep(committed_steps(self.directory))
        for step in removed:
            shutil.rmtree(self.directory / step_dir_name(step), ignore_errors=True)
        return removed

    def _make_room(self, job: _Job) -> None:
        """Before writing: when the disk has less free space than the save needs (estimated from the previous
        save, else from the state's size), remove now the checkpoints retention would remove after this save,
        oldest first, until it fits; said in an event (``checkpoint_made_room``). Without this, a full disk
        would fail every later save: retention frees space only after a commit."""
        steps = committed_steps(self.directory)
        needed = self._estimate_bytes(job, steps)
        try:
            free = shutil.disk_usage(self.directory).free
        except OSError:
            return
        if free >= needed:
            return
        removed = []
        with_this = sorted({*steps, job.step})
        for step in self._beyond_keep(with_this):
            if shutil.disk_usage(self.directory).free >= needed:
                break
            if step == job.step:
                continue
            shutil.rmtree(self.directory / step_dir_name(step), ignore_errors=True)
            removed.append(step)
        now = shutil.disk_usage(self.directory).free
        names = ", ".join(step_dir_name(s) for s in removed) or "nothing (every checkpoint is kept by --ckpt-keep)"
        outcome = "" if now >= needed else "; still short, the save may fail"
        self._event(
            f"disk short for step {job.step}: {free / 1e6:.1f} MB free, about {needed / 1e6:.1f} MB needed; "
            f"removed {names} before writing (retention would after this save){outcome}",
            telemetry_pb2.CheckpointDetail.PHASE_MADE_ROOM,
            job.step,
            severity=WARNING,
            path=str(self.directory),
            bytes=needed,
            removed=removed,
            free_bytes=free,
        )

    def _estimate_bytes(self, job: _Job, steps: list[int]) -> int:
        """The bytes a save of ``job`` will take: the newest checkpoint's size, else this rank's share times the
        world size; with a margin for the metadata and the filesystem's own blocks."""
        estimate = self._last_total
        if not estimate and steps:
            with contextlib.suppress(CheckpointError, OSError):
                estimate = read_metadata(self.directory / step_dir_name(steps[-1])).total_bytes
        if not estimate:
            estimate = sum(item.data.numel() * item.data.element_size() for item in job.items) * self.world_size
        return int(estimate * 1.05) + (1 << 20)

    def _failed(self, step: int, error: str) -> None:
        self._event(
            f"{error}; latest unchanged", telemetry_pb2.CheckpointDetail.PHASE_FAILED, step, severity=WARNING,
            error=error,
        )  # fmt: skip

    def _event(self, text: str, phase: int, step: int, severity: int = INFO, **detail: Any) -> None:
        if self.on_event is not None:
            checkpoint = telemetry_pb2.CheckpointDetail(phase=phase, step=step, **detail)  # type: ignore[arg-type]
            self.on_event(make_event(text, checkpoint, severity=severity, rank=self.rank, step=step))


def remove_unfinished(directory: Path) -> list[Path]:
    """Delete ``*.tmp`` step directories (saves that never committed); call before a run's first save."""
    removed = []
    if directory.is_dir():
        for entry in directory.iterdir():
            if entry.is_dir() and entry.name.startswith("step_") and entry.name.endswith(".tmp"):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed
