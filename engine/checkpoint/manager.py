"""What a training run does with checkpoints, in one place: the trainer calls it and decides nothing itself.

Modelled on torchtitan's ``CheckpointManager``: the trainer hands over what a checkpoint holds (model,
optimizer, data loader, RNG) once, then calls :meth:`CheckpointManager.load` before the first step,
:meth:`~CheckpointManager.save` after every step (the manager decides whether this step is saved),
:meth:`~CheckpointManager.before_optimizer_step` before every optimizer step, and
:meth:`~CheckpointManager.close` at the end. The manager owns:

- resume: this run's newest committed checkpoint, or the step a restart asked for (the run directory's
  restart request, agreed on by every rank);
- init-from (``--init-from``): another run's weights, with its optimizer state or a fresh one;
- the save schedule (``--ckpt-every`` and the last step) and saves requested by a ``CHECKPOINT`` command
  (:meth:`~CheckpointManager.request_save`, accepted or refused with a reason);
- retention (``keep_last`` / ``keep_every``, applied by the :class:`Checkpointer` after each commit) and the
  cleanup of saves an earlier attempt left unfinished;
- the events that say so (``resumed``, ``initialized``, ``restart_from_missing``, ``checkpoint_cleanup``,
  ``checkpoint_refused``, and the checkpointer's own).

A run without ``--ckpt-dir`` has a manager too: it may still init from a checkpoint, and refuses requested
saves.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from google.protobuf.message import Message

from megascope.engine.checkpoint.checkpointer import Checkpointer, remove_unfinished
from megascope.engine.checkpoint.format import CheckpointError, committed_steps, step_dir_name
from megascope.engine.checkpoint.loader import load
from megascope.engine.config import TrainConfig
from megascope.engine.runtime.faults import FaultInjector
from megascope.engine.runtime.run_dir import clear_restart_request, read_restart_request
from megascope.protos.events import make_event
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
            step = self._resume(self._resume_source(self.directory))
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

    def _resume_source(self, directory: Path) -> Path:
        """The newest checkpoint, unless a restart asked for an earlier one (the run directory's restart request).

        Every rank reads its own node's request and the ranks agree on one step (a collective every rank makes,
        so a node whose agent got no request follows the others); then the request is removed, for one restart.
        """
        asked = read_restart_request(self.config.run_dir)
        step = asked
        if dist.is_initialized():
            agreed = torch.tensor([asked], dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
            step = int(agreed.item())
        clear_restart_request(self.config.run_dir)  # every rank has read it: the all-reduce waited for all
        if not step:
            return directory
        if step not in committed_steps(directory):
            missing = telemetry_pb2.ResumeDetail(
                source=telemetry_pb2.ResumeDetail.SOURCE_MISSING_STEP, path=str(directory), step=step
            )
            self._event(f"no committed checkpoint at step {step}; resuming the newest", missing, 0)
            return directory
        return directory / step_dir_name(step)

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
        self._event(text, resumed, step)
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

    def _event(self, text: str, detail: Message, step: int) -> None:
        if self._emit is not None:
            self._emit(make_event(text, detail, rank=self.rank, step=step))
