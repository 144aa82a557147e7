"""megascope for PyTorch Lightning: one callback.

::

    from megascope.api.lightning import MegascopeCallback

    trainer = Trainer(max_steps=1000, callbacks=[MegascopeCallback()])

Lightning comes in two packages with two ``Callback`` base classes that each ``Trainer`` checks for:
``pytorch_lightning`` and ``lightning`` (``lightning.pytorch``). ``MegascopeCallback`` subclasses the one your
script imported (``pytorch_lightning`` when it imported both or neither); ``callback_class("lightning.pytorch")``
names one explicitly. Lightning is imported when the class is first asked for, never by ``megascope.api``.

Every optimizer step (``trainer.global_step``) of every rank is reported with:

- ``loss``: from the ``training_step`` output of each of the step's batches (Lightning hands callbacks the loss
  already divided by ``accumulate_grad_batches``, so their sum is the step's mean); read on megascope's thread.
- ``tokens``: ``tokens_of(batch)`` summed over the step's batches. By default: the element count of
  ``batch["input_ids"]``, or of the batch's first element when that is an integer tensor (token ids); nothing
  otherwise. Pass ``tokens_of=lambda batch: ...`` for another layout.
- ``lr``: the first parameter group's learning rate as the optimizer step used it.
- ``grad_norm`` with ``grad_norm=True``: the total 2-norm of this rank's gradients before clipping (computed on
  the device, read on megascope's thread). Off by default: it reads every gradient once more per step, and under
  FSDP or DeepSpeed it would be the norm of this rank's shard only.
- the step time, split into the wait for the batches (``data``) and the rest.

Commands from the dashboard are carried out at a step boundary: "save a checkpoint" calls
``trainer.save_checkpoint`` (into the ``ModelCheckpoint``'s directory, else ``<default_root_dir>/checkpoints``) on
every rank, "stop" sets ``trainer.should_stop``.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import megascope.api as megascope
from megascope.api._run import default_tokens

__all__ = ["MegascopeCallback", "callback_class", "default_tokens"]  # noqa: F822 (made on first access)

PACKAGES = ("pytorch_lightning", "lightning.pytorch")
"""The two importable Lightnings, each with its own ``Callback`` base class."""
_CLASSES: dict[str, type] = {}


def callback_class(package: str | None = None) -> type:
    """``MegascopeCallback`` for ``package`` (``"pytorch_lightning"`` or ``"lightning.pytorch"``); by default the
    one the script imported."""
    if package is None:
        imported = [name for name in PACKAGES if name in sys.modules]
        package = imported[0] if len(imported) == 1 else PACKAGES[0]
    if package not in PACKAGES:
        raise ValueError(f"package must be one of {', '.join(PACKAGES)}, not {package!r}")
    if package not in _CLASSES:
        try:
            module = importlib.import_module(package)
        except ImportError as error:
            raise ImportError(
                f"megascope's Lightning callback needs {package}: pip install "
                f"{'pytorch-lightning' if package == PACKAGES[0] else 'lightning'}"
            ) from error
        _CLASSES[package] = _build(module.Callback)
    return _CLASSES[package]


def __getattr__(name: str) -> Any:
    if name == "MegascopeCallback":
        return callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build(base: type) -> type:
    import torch

    from megascope.protos.megascope.v1 import worker_pb2

    class MegascopeCallback(base):  # type: ignore[valid-type,misc]
        """Reports each optimizer step of a Lightning ``Trainer`` to megascope; see :mod:`megascope.api.lightning`."""

        def __init__(self, *, tokens_of: Callable[[Any], int | None] = default_tokens, grad_norm: bool = False) -> None:
            super().__init__()
            self.tokens_of = tokens_of
            self.grad_norm = grad_norm
            self._run: megascope.Run | None = None
            self._reported = -1
            self._loss: torch.Tensor | None = None
            self._batches = 0
            self._tokens = 0
            self._lr: float | None = None
            self._norm: torch.Tensor | None = None
            self._data: Any = None
            self._saves: set[int] = set()
            self._stops: set[int] = set()

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._run = megascope.init(handle_commands=True)
            self._reported = int(trainer.global_step)
            self._start_data_wait()

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if self._data is not None:
                self._data.__exit__(None, None, None)
                self._data = None

        def on_before_optimizer_step(self, trainer: Any, pl_module: Any, optimizer: Any) -> None:
            if self._run is None or not self._run.active:
                return
            groups = getattr(optimizer, "param_groups", None)
            lr = groups[0].get("lr") if groups else None
            self._lr = float(lr) if isinstance(lr, int | float) else None
            if self.grad_norm:
                grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
                self._norm = torch.nn.utils.get_total_norm(grads).detach() if grads else None

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if self._run is None or not self._run.active:
                return
            loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            if isinstance(loss, torch.Tensor) and loss.numel() == 1:
                loss = loss.detach().reshape(())
                self._loss = loss if self._loss is None else self._loss + loss
                self._batches += 1
            try:
                tokens = self.tokens_of(batch)
            except Exception:  # a user's tokens_of that does not fit a batch: no tokens, training goes on
                tokens = None
            if isinstance(tokens, int):
                self._tokens += tokens
            step = int(trainer.global_step)
            if step != self._reported:  # the optimizer stepped: this batch ended a step
                self._reported = step
                self._report(trainer, pl_module, step)
            self._start_data_wait()

        def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
            self._start_data_wait()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            # Not finish(): the script may test or predict after fit(); the API reports "finished" at exit.
            self._data = None

        def _report(self, trainer: Any, pl_module: Any, step: int) -> None:
            loss = self._loss
            if loss is not None and not pl_module.automatic_optimization:
                loss = loss / self._batches  # manual optimization: the outputs are whatever training_step returned
            megascope.step(loss=loss, tokens=self._tokens or None, lr=self._lr, grad_norm=self._norm, step=step)
            self._loss, self._batches, self._tokens, self._norm = None, 0, 0, None
            self._take_commands(trainer, step)

        def _start_data_wait(self) -> None:
            # Validation and checkpoints end with their own event; the next batch is fetched after the last of them.
            # A phase entered again before it is left adds nothing: only the last start counts.
            if self._run is None or not self._run.active:
                return
            self._data = megascope.phase("data")
            self._data.__enter__()

        def _take_commands(self, trainer: Any, done: int) -> None:
            assert self._run is not None
            for command in self._run.pending_commands():
                at = command.step or done
                if command.kind == worker_pb2.COMMAND_KIND_CHECKPOINT and at >= done:
                    self._saves.add(at)
                    self._run.answer(command, True, f"will save after step {at} in {self._checkpoint_dir(trainer)}")
                elif command.kind == worker_pb2.COMMAND_KIND_STOP and at >= done:
                    self._stops.add(at)
                    self._run.answer(command, True, f"will stop after step {at}")
                elif at < done:
                    self._run.answer(command, False, f"step {at} is already done (this rank is at step {done})")
                else:
                    self._run.answer(command, False, f"unknown command kind {command.kind}")
            if done in self._saves:
                self._saves.discard(done)
                # Every rank calls it (the strategy decides who writes): it may be a collective.
                trainer.save_checkpoint(self._checkpoint_dir(trainer) / f"megascope-step{done}.ckpt")
            if done in self._stops:
                self._stops.discard(done)
                trainer.should_stop = True

        @staticmethod
        def _checkpoint_dir(trainer: Any) -> Path:
            dirpath = getattr(trainer.checkpoint_callback, "dirpath", None)
            return Path(dirpath) if dirpath else Path(trainer.default_root_dir) / "checkpoints"

    return MegascopeCallback
