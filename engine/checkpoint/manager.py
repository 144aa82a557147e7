"""What a training run does with checkpoints, in one place: the trainer calls it and decides nothing itself.

Modelled on torchtitan's ``CheckpointManager``: the trainer hands over what a checkpoint holds (model,
optimizer, data loader, RNG) once, then calls :meth:`CheckpointManager.load` before the first step,
:meth:`~CheckpointManager.save` after every step (the manager decides whether this step is saved),
:meth:`~CheckpointManager.before_optimizer_step` before every optimizer step, and
:meth:`~CheckpointManager.close` at the end. The manager owns:

- resume: this run's newest committed checkpoint, or the step a restart asked for (the run directory's
  restart request, agreed on by every rank); one that does not verify is skipped with a warning
  (``resume_skipped``) for the next older one, and set aside as ``step_N.damaged`` when damaged;
- init-from (``--init-from``): another run's weights, with its optimizer state or a fresh one;
- the save schedule (``--ckpt-every`` and the last step) and saves requested by a ``CHECKPOINT`` command
  (:meth:`~CheckpointManager.request_save`, accepted or refused with a reason);
- retention (``keep_last`` / ``keep_every``, applied by the :class:`Checkpointer` after each commit) and the
  cleanup of saves an earlier attempt left unfinished;
- the events that say so (``resumed``, ``resume_skipped``, ``initialized``, ``restart_from_missing``,
  ``checkpoint_cleanup``, ``checkpoint_refused``, and the checkpointer's own).

A run without ``--ckpt-dir`` has a manager too: it may still init from a checkpoint, and refuses requested
saves.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from google.protobuf.message import Message

from megascope.engine.checkpoint.checkpointer import Checkpointer, remove_unfinished
from megascope.engine.checkpoint.format import (
    LATEST,
    METADATA,
    CheckpointError,
    committed_steps,
    read_latest,
    step_dir_name,
    write_atomically,
)
from megascope.engine.checkpoint.loader import load
from megascope.engine.config import TrainConfig
from megascope.engine.runtime.faults import FaultInjector
from megascope.engine.runtime.run_dir import clear_restart_request, read_restart_request
from megascope.protos.events import ERROR, INFO, WARNING, make_event
from megascope.protos.megascope.v1 import telemetry_pb2


class DataState(Protocol):
    """The data loader as the manager sees it: its position is restored on resume (``PackedBatches``)."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


EmitEvent = Callable[[telemetry_pb2.Event], None]
"""Where the manager's events go (the rank's telemetry); it may be called from the checkpointer's thread."""


class CheckpointManager:
    """A rank's checkpoints: resume or init-from, the save schedule, requested saves, retention; see the module."""

    def __init__(
        self,
        config: TrainConfig,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        data: DataState,
        *,
        rank: int = 0,
        world_size: int = 1,
        group: dist.ProcessGroup | None = None,
        device: torch.device | None = None,
        emit: EmitEvent | None = None,
        faults: FaultInjector | None = None,
    ) -> None:
        """``group``: the checkpoint's own gloo group (None with one process); ``device``: where the training
        group's collectives run (the restart step is agreed on there)."""
        self.config = config
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.rank = rank
        self.world_size = world_size
        self.group = group
        self.device = device if device is not None else torch.device("cpu")
        self._emit = emit
        self._faults = faults
        self.directory = Path(config.checkpoint.dir) if config.checkpoint.dir else None
        self.checkpointer: Checkpointer | None = None
        self.resumed_from: int | None = None
        """The step this start resumed from; None when it started fresh (or from --init-from)."""
        self._requested: set[int] = set()
        self._resumed_event: tuple[str, Message, int] | None = None
        """Steps a CHECKPOINT command asked to save after, accepted and not reached yet."""

    # --- start --------------------------------------------------------------------------------------------

    def load(self) -> int:
        """Resume or init-from as the config says, and get ready to save; the step training goes on from."""
        ckpt = self.config.checkpoint
        if self.directory is None:
            if ckpt.init_from:
                self._init_from(Path(ckpt.init_from))
            return 0
        step = 0
        if ckpt.resume and committed_steps(self.directory):
            step = self._resume_first_good(self._resume_candidates(self.directory))
        elif ckpt.init_from:  # a restart of this run resumes its own checkpoints instead (the branch above)
            self._init_from(Path(ckpt.init_from))
        if self.rank == 0:
            for path in remove_unfinished(self.directory):
                cleanup = telemetry_pb2.CheckpointDetail(
                    phase=telemetry_pb2.CheckpointDetail.PHASE_CLEANUP, path=str(path)
                )
                self._event(f"removed the unfinished save {path.name}", cleanup, step)
        self.checkpointer = Checkpointer(
            self.directory, self.rank, self.world_size, self.group, layout="ddp", keep_last=ckpt.keep_last,
            keep_every=ckpt.keep_every, on_event=self._emit, faults=self._faults,
        )  # fmt: skip
        return step

    def start_without_load(self) -> None:
        """Get ready to save without loading anything: a replacement rank of an in-place recovery, whose state
        comes from another rank (engine/recovery.py), not from disk."""
        if self.directory is None:
            return
        ckpt = self.config.checkpoint
        self.checkpointer = Checkpointer(
            self.directory, self.rank, self.world_size, self.group, layout="ddp", keep_last=ckpt.keep_last,
            keep_every=ckpt.keep_every, on_event=self._emit, faults=self._faults,
        )  # fmt: skip

    def _resume_candidates(self, directory: Path) -> list[Path]:
        """Where to resume from, best first: the step a restart asked for (the run directory's restart request)
        or else the one ``latest`` names, then every older committed step, newest first.

        Every rank reads its own node's request and the ranks agree on one step (a collective every rank makes,
        so a node whose agent got no request follows the others); then the request is removed, for one restart.
        ``latest`` naming no committed checkpoint (a missing directory, an absolute path) is a skipped
        candidate: said, and the newest committed step is tried instead.
        """
        asked = read_restart_request(self.config.run_dir)
        step = asked
        if dist.is_initialized():
            agreed = torch.tensor([asked], dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            step = int(agreed.item())
        clear_restart_request(self.config.run_dir)  # every rank has read it: the all-reduce waited for all
        steps = committed_steps(directory)
        first: int | None = None
        if step:
            if step in steps:
                first = step
            else:
                missing = telemetry_pb2.ResumeDetail(
                    source=telemetry_pb2.ResumeDetail.SOURCE_MISSING_STEP, path=str(directory), step=step
                )
                self._event(f"no committed checkpoint at step {step}; resuming the newest", missing, 0)
        if first is None:
            first = self._latest_step(directory, steps)
        if first is not None:
            steps = [s for s in steps if s <= first]
        return [directory / step_dir_name(s) for s in reversed(steps)]

    def _latest_step(self, directory: Path, steps: list[int]) -> int | None:
        """The committed step ``latest`` names; None (said, as a skipped candidate) when it names none."""
        try:
            name = read_latest(directory)
        except (CheckpointError, OSError) as error:
            self._skipped(directory / LATEST, 0, _one_line(error))
            return None
        if name is None:
            return None
        step = int(name.removeprefix("step_"))
        if step not in steps:
            self._skipped(directory / LATEST, step, f"{LATEST} names {name}, which is not a committed checkpoint")
            return None
        return step

    def _resume_first_good(self, candidates: list[Path]) -> int:
        """Resume from the first candidate every rank can load (metadata readable, every file there with its size
        and header, every block read matching its CRC); the ones before it are said (``resume_skipped``, a
        warning) and set aside as ``step_N.damaged`` when damaged, so no later start tries them again."""
        reasons: list[str] = []
        passed: list[tuple[Path, str, bool, bool]] = []
        """(candidate, why, damaged, whether this rank's own read failed) of each candidate passed over."""
        for path in candidates:
            outcome, reason, own = _OK, "", True
            try:
                step = self._resume(path)
            except CheckpointError as error:
                outcome, reason = _DAMAGED, _one_line(error)
            except (KeyError, TypeError, ValueError) as error:  # metadata that parses but lacks what a resume reads
                outcome, reason = _DAMAGED, f"damaged metadata ({type(error).__name__}: {_one_line(error)})"
            except OSError as error:  # unreadable (permissions, I/O error): not set aside, only passed over
                outcome, reason = _UNREADABLE, _one_line(error)
            if dist.is_initialized():  # every rank resumes from the same checkpoint, or none does
                outcomes = torch.zeros(dist.get_world_size(), dtype=torch.int64, device=self.device)
                outcomes[dist.get_rank()] = outcome
                dist.all_reduce(outcomes, op=dist.ReduceOp.MAX)
                worst = int(outcomes.max().item())
                if worst != _OK and outcome == _OK:
                    failed = ", ".join(str(r) for r in outcomes.nonzero().flatten().tolist()[:8])
                    outcome, own = worst, False
                    reason = f"rank {failed} could not read it (its resume_skipped event says why)"
                    self.resumed_from = None
            if outcome == _OK:
                for skipped, why, damaged, mine in passed:  # set aside only once there is something to resume from
                    aside = self._set_aside(skipped) if damaged else None
                    self._skipped(skipped, int(skipped.name.removeprefix("step_")), why, aside, mine)
                self._point_latest_at(path)
                if self._resumed_event is not None:
                    self._event(*self._resumed_event)
                return step
            reasons.append(f"{path.name}: {reason}")
            passed.append((path, reason, outcome == _DAMAGED, own))
        for skipped, why, _, mine in passed:
            self._skipped(skipped, int(skipped.name.removeprefix("step_")), why, None, mine)
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be resumed from ({'; '.join(reasons)}); "
            "start over with --no-resume, or repair them"
        )

    def _set_aside(self, path: Path) -> Path | None:
        """Rank 0 renames a damaged checkpoint to ``step_N.damaged`` (kept for a look, never loaded, not counted
        by retention)."""
        if self.rank != 0:
            return None
        target = path.with_name(path.name + ".damaged")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.damaged{n}")
        try:
            path.rename(target)
        except OSError:
            return None
        return target

    def _point_latest_at(self, path: Path) -> None:
        """After a fallback, ``latest`` names the checkpoint resumed from (rank 0), so that it names a checkpoint."""
        if self.rank != 0 or self.directory is None:
            return
        try:
            current = read_latest(self.directory)
        except (CheckpointError, OSError):
            current = None
        if current is None or not (self.directory / current / METADATA).is_file():
            with contextlib.suppress(OSError):
                write_atomically(self.directory / LATEST, path.name + "\n")

    def _skipped(self, path: Path, step: int, reason: str, set_aside: Path | None = None, own: bool = False) -> None:
        """Say a candidate was passed over: rank 0 always, another rank only for a failure of its own read (the
        ranks see the same directory: one warning per job, not one per rank)."""
        if self.rank != 0 and not own:
            return
        detail = telemetry_pb2.ResumeDetail(
            source=telemetry_pb2.ResumeDetail.SOURCE_SKIPPED,
            path=str(path),
            step=step,
            error=reason,
            set_aside=str(set_aside or ""),
        )
        aside = f"; set aside as {set_aside.name}" if set_aside is not None else ""
        self._event(f"not resuming from {path.name}: {reason}{aside}", detail, 0, WARNING)

    def _resume(self, directory: Path) -> int:
        self._ensure_optimizer_state()
        targets = self._state()
        rng = torch.get_rng_state()
        targets_local = {f"rng/rank{self.rank}/cpu": rng}
        started = time.perf_counter()
        metadata, stats = load(directory, targets)
        # A rank that did not exist in the saving job keeps its own seed-derived RNG state.
        load(directory, targets_local, strict=False)
        torch.set_rng_state(rng)
        self.data.load_state_dict(metadata.extra["data"])
        step = self.resumed_from = int(metadata.extra["step"])
        seconds = time.perf_counter() - started
        resumed = telemetry_pb2.ResumeDetail(
            source=telemetry_pb2.ResumeDetail.SOURCE_RESUME,
            path=str(directory),
            step=step,
            load_seconds=seconds,
            bytes_read=stats.bytes_read,
        )
        text = f"resumed from step {step} ({directory}): read {stats.bytes_read / 1e6:.1f} MB in {seconds:.2f}s"
        self._resumed_event = (text, resumed, step)  # said once every rank agrees on this checkpoint
        return step

    def _init_from(self, path: Path) -> None:
        """PMA-init: this run's model weights from the checkpoint at ``path`` (a merge's output, say).

        Only the weights (and, with --init-optimizer keep, the optimizer state saved there); the step count,
        learning-rate schedule, data order and RNG stay this run's own, starting at step 0. Every rank reads
        the same file, so the replicas start identical.
        """
        started = time.perf_counter()
        metadata, stats = load(path, {f"model/{name}": t for name, t in self.model.state_dict().items()})
        optimizer = "fresh optimizer"
        keep = self.config.checkpoint.init_optimizer == "keep"
        if keep:
            if not any(name.startswith("optim/") for name in metadata.tensors):
                raise CheckpointError(f"--init-optimizer keep: {path} holds no optimizer state; use fresh")
            self._ensure_optimizer_state()
            optim = {k: v for k, v in self._state().items() if k.startswith("optim/")}
            _, more = load(path, optim)
            stats.bytes_read += more.bytes_read
            optimizer = "optimizer state from the checkpoint"
        merge = metadata.extra.get("merge")
        what = f"step {metadata.step}"
        if isinstance(merge, dict):
            what = f"{merge['method']} merge of steps {merge['steps']}"
        seconds = time.perf_counter() - started
        initialized = telemetry_pb2.ResumeDetail(
            source=telemetry_pb2.ResumeDetail.SOURCE_INIT_FROM,
            path=str(path),
            step=metadata.step,
            load_seconds=seconds,
            bytes_read=stats.bytes_read,
            optimizer="keep" if keep else "fresh",
        )
        text = (
            f"model weights from {path} ({what}), {optimizer}: read {stats.bytes_read / 1e6:.1f} MB in {seconds:.2f}s"
        )
        self._event(text, initialized, 0)

    # --- every step ---------------------------------------------------------------------------------------

    def request_save(self, step: int, current_step: int) -> tuple[bool, str]:
        """A CHECKPOINT command: save once ``step`` is done. Whether it will be, and the reason (for the ack).

        Called at a step boundary, ``current_step`` just done and not yet saved, so a request for it is in time.
        A refusal is also an event (``checkpoint_refused``).
        """
        if self.directory is None:
            return self._refuse(step, current_step, "a checkpoint was requested, but this run has no --ckpt-dir")
        if step < current_step:
            return self._refuse(step, current_step, f"the request to save step {step} came too late")
        if step > self.config.steps:
            return self._refuse(step, current_step, f"step {step} is past the run's last step ({self.config.steps})")
        self._requested.add(step)
        return True, f"will save after step {step}"

    def _refuse(self, step: int, current_step: int, reason: str) -> tuple[bool, str]:
        refused = telemetry_pb2.CheckpointDetail(
            phase=telemetry_pb2.CheckpointDetail.PHASE_REFUSED, step=step, error=reason
        )
        self._event(reason, refused, current_step)
        return False, reason

    def should_save(self, step: int, last: bool = False) -> bool:
        """Whether ``step`` is saved: the last step (the run's, or where a STOP ends it), every ``--ckpt-every``
        steps, or a requested step."""
        every = self.config.checkpoint.every
        scheduled = last or step == self.config.steps or bool(every and step % every == 0)
        return self.checkpointer is not None and (scheduled or step in self._requested)

    def save(self, step: int, data_position: dict[str, Any], last: bool = False) -> bool:
        """Save ``step`` if it is due (see :meth:`should_save`); whether a save started. ``data_position`` is the
        data loader's state right after this step's last batch, what a resume goes on from."""
        due = self.should_save(step, last)
        self._requested.discard(step)
        if not due:
            return False
        assert self.checkpointer is not None
        self.checkpointer.save(
            step,
            self._state(),
            extra={"step": step, "data": data_position, "world_size": self.world_size,
                   "config": json.loads(self.config.to_json())},
            local={f"rng/rank{self.rank}/cpu": torch.get_rng_state()},
        )  # fmt: skip
        return True

    def before_optimizer_step(self) -> None:
        """A save's staging must finish before the optimizer changes the weights it copies."""
        if self.checkpointer is not None:
            self.checkpointer.before_optimizer_step()

    def close(self) -> None:
        """Wait for the save in flight and stop the checkpointer."""
        if self.checkpointer is not None:
            self.checkpointer.close()
            history = self.checkpointer.history
            if self.rank == 0 and history and all(figures.error for figures in history):
                last = history[-1]
                failed = telemetry_pb2.CheckpointDetail(
                    phase=telemetry_pb2.CheckpointDetail.PHASE_FAILED, step=last.step, error=last.error or ""
                )
                text = f"every checkpoint save of this start failed ({len(history)}); nothing of it is saved"
                self._event(text, failed, last.step, ERROR)

    # --- in-place recovery ----------------------------------------------------------------------------------

    def settle(self) -> None:
        """Wait until the save in flight is over, committed or failed (a peer's death fails its commit, and rank 0
        then removes its unfinished directory): the process groups it uses may be destroyed after this."""
        if self.checkpointer is not None:
            self.checkpointer.wait()

    def release_group(self) -> None:
        """Let go of the (broken) checkpoint group, so that its last reference is the teardown's
        (engine/recovery.py destroy_groups): until :meth:`rebind`, nothing is saved."""
        self.group = None
        if self.checkpointer is not None:
            self.checkpointer.group = None

    def rebind(self, group: dist.ProcessGroup | None) -> None:
        """Save through ``group`` from now on: the checkpoint group of the process group formed again after a
        recovery. Every rank has settled its saves by then, so rank 0 removes what a failed one left behind."""
        self.group = group
        if self.checkpointer is None or self.directory is None:
            return
        self.checkpointer.group = group
        if self.rank == 0:
            for path in remove_unfinished(self.directory):
                cleanup = telemetry_pb2.CheckpointDetail(
                    phase=telemetry_pb2.CheckpointDetail.PHASE_CLEANUP, path=str(path)
                )
                self._event(f"removed the unfinished save {path.name}", cleanup, 0)

    def requested_steps(self) -> list[int]:
        """The steps a CHECKPOINT command asked for and not saved yet (a replacement takes them from a survivor)."""
        return sorted(self._requested)

    def set_requested_steps(self, steps: list[int]) -> None:
        self._requested = set(steps)

    def transfer_state(self, with_optimizer: bool) -> dict[str, torch.Tensor]:
        """The model's tensors and, with ``with_optimizer``, the optimizer's (created first where missing, as a
        resume does), by stable names: what an in-place recovery sends from one rank to the others."""
        if with_optimizer:
            self._ensure_optimizer_state()
        return self._state()

    # --- state --------------------------------------------------------------------------------------------

    def _state(self) -> dict[str, torch.Tensor]:
        """Model and optimizer tensors by stable names (parameter names, not optimizer indices)."""
        state = {f"model/{name}": tensor for name, tensor in self.model.state_dict().items()}
        for name, param in self.model.named_parameters():
            for key, value in self.optimizer.state.get(param, {}).items():
                state[f"optim/{name}/{key}"] = value
        return state

    def _ensure_optimizer_state(self) -> None:
        # AdamW creates its state lazily at the first step; a resume fills it in before that step.
        fused = bool(self.optimizer.defaults.get("fused"))
        for param in self.model.parameters():
            if not self.optimizer.state.get(param):
                self.optimizer.state[param] = {
                    "step": torch.zeros((), dtype=torch.float32, device=param.device if fused else "cpu"),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }

    def _event(self, text: str, detail: Message, step: int, severity: int = INFO) -> None:
        if self._emit is not None:
            self._emit(make_event(text, detail, severity=severity, rank=self.rank, step=step))


_OK, _UNREADABLE, _DAMAGED = 0, 1, 2
"""A resume candidate's outcome on one rank; the ranks agree on the worst (all-reduce MAX)."""


def _one_line(error: BaseException) -> str:
    text = (
        str(error)
        if not isinstance(error, OSError) or not error.strerror
        else (f"{error.filename}: {error.strerror}" if error.filename else error.strerror)
    )
    return " ".join(text.split()) or type(error).__name__
