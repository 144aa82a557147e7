"""Checkpoint merges (PMA) launched through the agent: one at a time, in the background, at low priority.

The merge itself is ``megascope merge`` (the engine's), run as a child process rather than in the agent: it
reads every input tensor, which in the agent would compete with the gRPC event loop for the GIL; as a process
it gets the lowest CPU and I/O priority, one CPU thread and no GPU (the training ranks own those), and can be
stopped at any moment. It prints one JSON object per line on stdout (``--progress json``): ``progress`` events with
tensor and byte counts, then one ``done`` event with the result. The runner keeps the newest state as a
``MergeProgress`` and wakes every ``StartMerge`` stream following the run; streams send the newest state when
they get to it, so a fast merge never queues thousands of messages.

Merges are written beside the run's checkpoint directory, never inside it: the trainer's retention and its
scan for the newest checkpoint to resume from look at that directory, and must not see merges.

    runs/x/checkpoints/step_00000100/...          the training run's checkpoints
    runs/x/checkpoints-merged/merge-sma-60-100-20250101-120000/   one directory per merge
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from megascope.agent.state import NodeState
from megascope.agent.validation import short
from megascope.engine.checkpoint.format import (
    METADATA,
    CheckpointError,
    committed_steps,
    read_metadata,
    resolve,
    step_dir_name,
)
from megascope.engine.checkpoint.merge import METHODS, MergeError, merge_weights, select_steps
from megascope.engine.checkpoint.streaming import tmp_path
from megascope.engine.runtime import parent_death
from megascope.protos import events
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

MERGED_SUFFIX = "-merged"
"""``<ckpt_dir><MERGED_SUFFIX>`` holds the merges of the run whose checkpoints are in ``ckpt_dir``."""
MERGE_COMMAND: tuple[str, ...] = (sys.executable, "-m", "megascope.agent.cli", "merge")
CANCEL_GRACE_SECONDS = 10.0
"""After SIGTERM a merge has this long to stop cleanly before it is killed."""
_STDERR_LINES = 20
_MAX_LINE_BYTES = 1 << 20
_Merge = telemetry_pb2.MergeDetail
_RUNNING = agent_pb2.MERGE_STATE_RUNNING
_DONE = agent_pb2.MERGE_STATE_DONE
_FAILED = agent_pb2.MERGE_STATE_FAILED
_CANCELLED = agent_pb2.MERGE_STATE_CANCELLED
_ENDED = (_DONE, _FAILED, _CANCELLED)


MAX_MERGE_INPUTS = 1000
"""Steps (and weights) of one StartMerge: a bound on the work a request can ask for before anything is checked."""


class MergeRefused(Exception):
    """A StartMerge that cannot run as asked; ``code`` is the gRPC status, the text names the field."""

    def __init__(self, code: grpc.StatusCode, text: str) -> None:
        super().__init__(short(text))  # a long status message is dropped by gRPC, and the caller sees no reason
        self.code = code


def merged_root(ckpt_dir: Path) -> Path:
    return ckpt_dir.parent / f"{ckpt_dir.name}{MERGED_SUFFIX}"


@dataclass(frozen=True)
class MergePlan:
    """A validated request: the inputs resolved to committed steps, oldest first, and where the result goes."""

    method: str
    steps: tuple[int, ...]
    out: Path
    alpha: float = 0.0
    """0: the method's default."""
    weights: tuple[float, ...] = ()
    evaluate: bool = False

    def arguments(self, ckpt_dir: Path) -> list[str]:
        """The merge command's arguments (the steps always explicit: the agent resolved ``last``/``every``)."""
        args = ["--ckpt-dir", str(ckpt_dir), "--method", self.method, "--steps", *map(str, self.steps)]
        if self.alpha:
            args += ["--alpha", repr(self.alpha)]
        if self.weights:
            args += ["--weights", *map(repr, self.weights)]
        args += ["--out", str(self.out), "--progress", "json"]
        return args + (["--eval"] if self.evaluate else [])


def _steps_text(steps: Sequence[int], most: int = 12) -> str:
    shown = ", ".join(map(str, steps[:most]))
    return shown + (f", ... ({len(steps)} in all)" if len(steps) > most else "") if steps else "none"


def plan_merge(request: agent_pb2.StartMergeRequest, ckpt_dir: Path | None, now: float | None = None) -> MergePlan:
    """Check ``request`` against the committed checkpoints in ``ckpt_dir``; raises :class:`MergeRefused`.

    The shape of the request is checked here, naming its fields; which steps ``last``/``every`` pick and what
    the weights may be are the engine's own rules (``select_steps``, ``merge_weights``), so the dashboard and
    ``megascope merge`` never disagree.
    """

    def invalid(text: str) -> MergeRefused:
        return MergeRefused(grpc.StatusCode.INVALID_ARGUMENT, text)

    # The request's size first: nothing else is looked at for one that asks too much.
    for name in ("steps", "weights"):
        given = len(getattr(request, name))
        if given > MAX_MERGE_INPUTS:
            raise invalid(f"{name}: at most {MAX_MERGE_INPUTS} checkpoints in one merge, got {given}")
    if request.last > MAX_MERGE_INPUTS:
        raise invalid(f"last: at most {MAX_MERGE_INPUTS} checkpoints in one merge, got {request.last}")
    if ckpt_dir is None:
        raise MergeRefused(
            grpc.StatusCode.FAILED_PRECONDITION,
            "this agent's run saves no checkpoints (start it with --ckpt-dir): there is nothing to merge",
        )
    weights = list(request.weights)
    # Explicit weights replace the method's ("weights" is the engine's name for that).
    method = request.method or ("weights" if weights else "")
    if method not in METHODS:
        raise invalid(f"method: must be one of {', '.join(METHODS)}, got {method!r}")
    if weights and method != "weights":
        raise invalid(f"weights: explicit weights replace the method: leave method empty, not {method!r}")
    alpha = request.alpha
    if not math.isfinite(alpha) or not 0 <= alpha <= 1:
        raise invalid(f"alpha: must be in (0, 1] (0 for the default), got {alpha}")
    if alpha and method != "ema":
        raise invalid(f"alpha: only ema takes an alpha; method is {method}")
    if request.last < 0 or request.every < 0:
        raise invalid(f"last and every: must be >= 0, got {request.last} and {request.every}")
    if request.steps and request.last:
        raise invalid("steps and last: give one of them, not both")
    if request.every and not request.last:
        raise invalid("every: only applies with last")
    if not request.steps and not request.last:
        raise invalid("steps or last: say which checkpoints to merge")
    if request.last == 1 or len(request.steps) == 1:
        raise invalid("steps or last: a merge needs at least 2 checkpoints, got 1")
    steps = list(request.steps)
    seen: set[int] = set()
    repeated: set[int] = set()
    for step in steps:  # linear: a request may list a thousand steps
        (repeated if step in seen else seen).add(step)
    if repeated:
        raise invalid(f"steps: {_steps_text(sorted(repeated))} listed more than once")

    try:
        chosen = select_steps(ckpt_dir, steps or None, request.last or None, request.every or None)
    except MergeError as error:
        # Well-formed but not what is on disk: steps that were never saved (or were removed by retention).
        code = grpc.StatusCode.NOT_FOUND if steps else grpc.StatusCode.FAILED_PRECONDITION
        raise MergeRefused(code, str(error)) from None
    try:
        merge_weights(method, len(chosen), alpha or None, weights or None)
    except MergeError as error:
        raise invalid(str(error)) from None

    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    base = merged_root(ckpt_dir) / f"merge-{method}-{chosen[0]}-{chosen[-1]}-{stamp}"
    out, n = base, 1
    while out.exists() or tmp_path(out).exists():  # two merges of the same inputs within a second
        n += 1
        out = base.with_name(f"{base.name}-{n}")
    return MergePlan(method, tuple(chosen), out, alpha, tuple(weights), request.eval)


# --- listing -----------------------------------------------------------------------------------------------


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


InfoCache = dict[tuple[str, int], agent_pb2.CheckpointInfo]
"""What a listing read, by (directory, metadata.json's mtime): a committed checkpoint never changes, and the
metadata of a large model is megabytes, so dashboards asking every few seconds must not read it again."""


def _info(path: Path, step_dir: Path, merged: bool, cache: InfoCache, seen: InfoCache) -> agent_pb2.CheckpointInfo:
    key = (str(path), (step_dir / METADATA).stat().st_mtime_ns)
    info = cache.get(key)
    if info is None:
        meta = read_metadata(step_dir)
        info = agent_pb2.CheckpointInfo(
            step=meta.step,
            path=str(path),
            wall_time=meta.created or (step_dir / METADATA).stat().st_mtime,
            size_bytes=_tree_bytes(path),
            world_size=meta.world_size,
            merged=merged,
        )
    seen[key] = info
    copy = agent_pb2.CheckpointInfo()
    copy.CopyFrom(info)
    return copy


def list_checkpoints(
    ckpt_dir: Path | None,
    val_losses: dict[int, float],
    merged_val_losses: dict[str, float],
    cache: InfoCache | None = None,
) -> agent_pb2.ListCheckpointsResponse:
    """The committed checkpoints of ``ckpt_dir`` and the merges beside it, oldest first (reads the disk).

    ``cache`` is updated to hold exactly what this listing found (so it never grows beyond one listing).
    """
    response = agent_pb2.ListCheckpointsResponse()
    if ckpt_dir is None:
        return response
    known = dict(cache or {})
    seen: InfoCache = {}
    response.directory = str(ckpt_dir)
    for step in committed_steps(ckpt_dir):
        step_dir = ckpt_dir / step_dir_name(step)
        # A checkpoint removed by retention between the scan and the read is simply no longer listed.
        with contextlib.suppress(CheckpointError, OSError):
            info = _info(step_dir, step_dir, False, known, seen)
            if step in val_losses:
                info.val_loss = val_losses[step]
            response.checkpoints.append(info)
    root = merged_root(ckpt_dir)
    merged = []
    for entry in sorted(root.iterdir()) if root.is_dir() else []:
        # Unfinished or cancelled merges have no committed checkpoint: they are not listed.
        with contextlib.suppress(CheckpointError, OSError):
            info = _info(entry, resolve(entry), True, known, seen)
            if str(entry) in merged_val_losses:
                info.val_loss = merged_val_losses[str(entry)]
            merged.append(info)
    response.merged.extend(sorted(merged, key=lambda info: info.wall_time))
    if cache is not None:
        cache.clear()
        cache.update(seen)
    return response


# --- running -----------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Run:
    plan: MergePlan
    progress: agent_pb2.MergeProgress
    """Replaced, never changed in place, so a follower can tell whether it has sent the newest."""
    wakeups: set[asyncio.Event] = field(default_factory=set)
    process: asyncio.subprocess.Process | None = None
    cancelling: bool = False
    task: asyncio.Task[None] | None = None


def _lower_priority(pid: int) -> None:
    """Best effort: the lowest CPU priority and the lowest best-effort I/O class, so training wins any contention.

    Best-effort rather than idle I/O: an idle-class merge could wait forever behind a busy data loader.
    """
    with contextlib.suppress(psutil.Error, OSError):
        process = psutil.Process(pid)
        process.nice(19)
        ionice = getattr(process, "ionice", None)  # Linux and Windows only
        if ionice is not None and hasattr(psutil, "IOPRIO_CLASS_BE"):
            ionice(psutil.IOPRIO_CLASS_BE, 7)


def _parse(line: bytes) -> dict[str, Any] | None:
    """One progress line as a dict; None for anything else the command printed."""
    try:
        message = json.loads(line)
    except ValueError:
        return None
    return message if isinstance(message, dict) and isinstance(message.get("event"), str) else None


def _discard(out: Path) -> None:
    """Remove what a stopped merge left: its unfinished ``OUT.tmp`` (a killed merge cannot clean up), or ``OUT``."""
    for path in (out, tmp_path(out)):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)


def _failure_reason(code: int | None, stderr: Sequence[str]) -> str:
    """The command's own ``megascope merge: error: ...`` line when there is one, else its last words."""
    for line in reversed(stderr):
        if ": error: " in line:
            return line.split(": error: ", 1)[1]
    tail = next((line for line in reversed(stderr) if line.strip()), "")
    return f"the merge exited with code {code}" + (f": {tail}" if tail else "")


class MergeRunner:
    """Runs one merge at a time for an agent and keeps what the listing needs to know about past ones."""

    def __init__(
        self,
        state: NodeState,
        ckpt_dir: str | Path | None,
        *,
        command: Sequence[str] = MERGE_COMMAND,
        cancel_grace_seconds: float = CANCEL_GRACE_SECONDS,
    ) -> None:
        self.state = state
        self.ckpt_dir = Path(ckpt_dir).absolute() if ckpt_dir else None  # listed as a path on this machine
        self.command = list(command)
        self.cancel_grace_seconds = cancel_grace_seconds
        self._run: _Run | None = None
        self._merged_val_losses: dict[str, float] = {}
        """Validation loss of each merge made by this agent, by its directory."""
        self._input_val_losses: dict[int, float] = {}
        """Validation losses of training checkpoints measured by merges (``--eval``), by step."""
        self._listed: InfoCache = {}

    # --- queries -------------------------------------------------------------------------------------

    def status(self) -> agent_pb2.MergeProgress:
        """The running or last merge (state UNSPECIFIED when there has been none)."""
        return self._run.progress if self._run is not None else agent_pb2.MergeProgress()

    async def list_checkpoints(self) -> agent_pb2.ListCheckpointsResponse:
        # Copies taken here, on the loop that changes them; the filtering and the disk in a thread.
        reports = list(self.state.step_reports)
        measured, merged = dict(self._input_val_losses), dict(self._merged_val_losses)

        def listing() -> agent_pb2.ListCheckpointsResponse:
            # What the run reported wins over what a merge measured (the same batches, so the same number).
            val_losses = measured | {r.step: r.val_loss for r in reports if r.HasField("val_loss")}
            return list_checkpoints(self.ckpt_dir, val_losses, merged, self._listed)

        return await asyncio.to_thread(listing)

    # --- control -------------------------------------------------------------------------------------

    def plan(self, request: agent_pb2.StartMergeRequest) -> MergePlan:
        """Validate ``request`` (reads the checkpoint directory: call it off the event loop)."""
        return plan_merge(request, self.ckpt_dir)

    def start(self, plan: MergePlan) -> _Run:
        """Start the merge in the background; FAILED_PRECONDITION while another one runs."""
        running = self._run
        if running is not None and running.progress.state not in _ENDED:
            raise MergeRefused(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"a merge is already running ({running.plan.method} of steps {_steps_text(running.plan.steps)} "
                f"into {running.plan.out}); wait for it or cancel it",
            )
        run = _Run(
            plan,
            agent_pb2.MergeProgress(
                state=_RUNNING, message="starting", out=str(plan.out), steps=plan.steps, method=plan.method
            ),
        )
        self._run = run
        self.state.event(
            f"merging steps {_steps_text(plan.steps)} ({plan.method}) into {plan.out}",
            _merge_detail(_Merge.PHASE_STARTED, plan.method, plan.steps, str(plan.out)),
        )
        run.task = asyncio.ensure_future(self._execute(run))
        return run

    def cancel(self) -> bool:
        """Ask the running merge to stop (SIGTERM, then SIGKILL after the grace); False when none runs."""
        run = self._run
        if run is None or run.progress.state in _ENDED or run.cancelling:
            return False
        run.cancelling = True
        self._update(run, message="cancelling")
        if run.process is not None:
            self._terminate(run.process)
        return True

    async def close(self) -> None:
        """Cancel a running merge and wait until it has stopped (the agent is shutting down)."""
        run = self._run
        self.cancel()
        if run is not None and run.task is not None:
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.task), self.cancel_grace_seconds + 5)

    async def follow(self, run: _Run) -> AsyncIterator[agent_pb2.MergeProgress]:
        """The run's state now, then each newer state, until it ends (the last one sent is its end state)."""
        wakeup = asyncio.Event()
        run.wakeups.add(wakeup)
        try:
            while True:
                wakeup.clear()
                progress = run.progress
                yield progress
                if progress.state in _ENDED:
                    return
                if run.progress is progress:  # nothing newer arrived while that one was being sent
                    await wakeup.wait()
        finally:
            run.wakeups.discard(wakeup)

    # --- the child process -----------------------------------------------------------------------------

    def _update(self, run: _Run, **fields: Any) -> None:
        progress = agent_pb2.MergeProgress()
        progress.CopyFrom(run.progress)
        for name, value in fields.items():
            if name == "input_val_losses":
                progress.input_val_losses.update(value)
            else:
                setattr(progress, name, value)
        run.progress = progress
        for wakeup in run.wakeups:
            wakeup.set()

    def _terminate(self, process: asyncio.subprocess.Process) -> None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)  # the merge stops cleanly and publishes nothing

        def kill() -> None:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGKILL)  # its own session: anything it started goes too

        asyncio.get_running_loop().call_later(self.cancel_grace_seconds, kill)

    async def _execute(self, run: _Run) -> None:
        """Run the merge to its end; whatever goes wrong, the run ends (a stuck RUNNING would refuse every merge)."""
        try:
            await self._run_process(run)
        except Exception as error:  # a bug or an unreadable stream: end this merge, keep the agent serving
            if run.process is not None and run.process.returncode is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(run.process.pid, signal.SIGKILL)
            if run.progress.state not in _ENDED:
                self._finish(run, _FAILED, f"the agent lost the merge: {type(error).__name__}: {error}")

    async def _run_process(self, run: _Run) -> None:
        plan, ckpt_dir = run.plan, self.ckpt_dir
        assert ckpt_dir is not None  # plan_merge refuses a run without one
        env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            # One CPU thread and no GPU: the training ranks own the node's cores and devices; the merge only
            # needs to stream tensors, and on a training GPU it could take memory the ranks need.
            OMP_NUM_THREADS="1",
            MKL_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
        )
        if run.cancelling:
            self._finish(run, _CANCELLED, "cancelled before it started")
            return
        try:
            plan.out.parent.mkdir(parents=True, exist_ok=True)
            # Tied to the agent as the ranks are: if the agent dies (kill -9 included), the merge gets SIGTERM,
            # stops and publishes nothing, rather than publish into a run no agent watches any more.
            process = await asyncio.create_subprocess_exec(
                *parent_death.command(signal.SIGTERM, [*self.command, *plan.arguments(ckpt_dir)]),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # a Ctrl-C meant for the agent does not reach it; the agent stops it
                env=env,
                limit=_MAX_LINE_BYTES,
            )
        except OSError as error:
            self._finish(run, _FAILED, f"could not start the merge command: {error}")
            return
        run.process = process
        _lower_priority(process.pid)
        if run.cancelling:
            self._terminate(process)
        stderr: deque[str] = deque(maxlen=_STDERR_LINES)
        errors = asyncio.ensure_future(self._read_stderr(process, stderr))
        result: dict[str, Any] | None = None
        assert process.stdout is not None
        async for line in process.stdout:
            message = _parse(line)
            if message is None:
                continue
            if message["event"] == "progress":
                self._progress(run, message)
            elif message["event"] == "done":
                result = message
        code = await process.wait()
        await errors
        if run.cancelling:
            # The merge publishes nothing when it stops on SIGTERM; one killed after the grace may leave a part.
            await asyncio.to_thread(_discard, plan.out)
            self._finish(run, _CANCELLED, "cancelled; nothing was published")
        elif code == 0 and result is not None:
            self._done(run, result)
        else:
            reason = _failure_reason(code, stderr) if code else "the merge ended without reporting a result"
            self._finish(run, _FAILED, reason)

    @staticmethod
    async def _read_stderr(process: asyncio.subprocess.Process, tail: deque[str]) -> None:
        assert process.stderr is not None
        async for line in process.stderr:  # read all of it, or a chatty merge would block on a full pipe
            tail.append(line.decode(errors="replace").rstrip())

    def _progress(self, run: _Run, message: dict[str, Any]) -> None:
        try:
            counts = {
                name: int(message[name]) for name in ("tensors_done", "tensors_total", "bytes_done", "bytes_total")
            }
        except (KeyError, TypeError, ValueError):
            return  # a malformed line is not worth failing a merge over
        text = f"merging: {counts['tensors_done']}/{counts['tensors_total']} tensors"
        self._update(run, message=text, **counts)

    def _done(self, run: _Run, result: dict[str, Any]) -> None:
        val_loss = result.get("val_loss")
        inputs: dict[int, float] = {}
        with contextlib.suppress(AttributeError, TypeError, ValueError):
            inputs = {int(step): float(loss) for step, loss in result.get("input_val_losses", {}).items()}
        out = str(result.get("out") or run.plan.out)
        fields: dict[str, Any] = {"input_val_losses": inputs, "out": out}
        detail = _merge_detail(_Merge.PHASE_DONE, run.plan.method, run.plan.steps, out)
        detail.input_val_losses.update(inputs)
        text = f"merged steps {_steps_text(run.plan.steps)} ({run.plan.method}) into {out}"
        if isinstance(val_loss, int | float):
            fields["val_loss"] = detail.val_loss = float(val_loss)
            self._merged_val_losses[str(run.plan.out)] = float(val_loss)
            text += f"; validation loss {val_loss:.4f}"
            if inputs:
                text += f" (inputs {min(inputs.values()):.4f} .. {max(inputs.values()):.4f})"
        if inputs:
            self._input_val_losses.update(inputs)
        self._update(run, state=_DONE, message="done", **fields)
        self.state.event(text, detail)

    def _finish(self, run: _Run, state: int, message: str) -> None:
        self._update(run, state=state, message=message)
        out = str(run.plan.out)
        if state == _CANCELLED:
            detail = _merge_detail(_Merge.PHASE_CANCELLED, run.plan.method, run.plan.steps, out)
            self.state.event(f"merge into {out}: {message}", detail, severity=events.WARNING)
        else:
            detail = _merge_detail(_Merge.PHASE_FAILED, run.plan.method, run.plan.steps, out)
            self.state.event(f"merge into {out} failed: {message}", detail, severity=events.ERROR)


def _merge_detail(
    phase: telemetry_pb2.MergeDetail.Phase.ValueType, method: str, steps: Sequence[int], out: str
) -> telemetry_pb2.MergeDetail:
    return telemetry_pb2.MergeDetail(phase=phase, method=method, steps=steps, out=out)
