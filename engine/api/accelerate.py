"""megascope for an Accelerate training loop: one object, called once per batch.

Accelerate has no callbacks, and its trackers (``accelerator.log``) run on the main process only, while megascope
needs every rank (a straggler is a rank). So the loop reports itself, with :class:`StepReporter` doing the
bookkeeping of gradient accumulation::

    import megascope.api as megascope
from megascope.api._run import default_tokens
    from megascope.api.accelerate import StepReporter

    report = StepReporter(accelerator, optimizer)             # after accelerator.prepare(...)
    for batch in megascope.batches(loader):                   # optional: times the wait for each batch
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step(); scheduler.step(); optimizer.zero_grad()
        report(loss, batch)

``report(loss, batch)`` adds up the micro-batches and sends one step when Accelerate synchronised the gradients
(``accelerator.sync_gradients``: the optimizer really stepped), with:

- ``loss``: the mean of the step's micro-batch losses on this rank (a tensor is read on megascope's thread, never
  with ``.item()`` in the loop);
- ``tokens``: ``tokens_of(batch)`` summed over the step (default: the element count of ``batch["input_ids"]`` or
  of a leading integer tensor);
- ``lr``: with ``optimizer`` given, the first parameter group's learning rate when the optimizer stepped (so the
  rate this step used, even when the scheduler steps before ``report``);
- ``grad_norm=`` and any other keyword are passed on (``report(loss, batch, grad_norm=norm)`` with the norm
  ``accelerator.clip_grad_norm_`` returned).

Without an agent every call returns after a few attribute reads. Commands from the dashboard (save, stop) are
answered with a refusal that says why: a plain loop has no way to act on them.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

import megascope.api as megascope
from megascope.api._run import default_tokens

__all__ = ["StepReporter", "default_tokens"]


class StepReporter:
    """Reports an Accelerate loop's optimizer steps to megascope; see :mod:`megascope.api.accelerate`."""

    def __init__(
        self,
        accelerator: Any,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        tokens_of: Callable[[Any], int | None] = default_tokens,
    ) -> None:
        self.accelerator = accelerator
        self.tokens_of = tokens_of
        self.run = megascope.init()
        self._loss: torch.Tensor | float | None = None
        self._batches = 0
        self._tokens = 0
        self._lr: float | None = None
        if optimizer is not None and self.run.active:
            # Accelerate's wrapper skips the inner optimizer's step() while accumulating; a hook on the inner one
            # fires exactly when parameters change, before the scheduler moves the rate on.
            inner = getattr(optimizer, "optimizer", optimizer)
            if isinstance(inner, torch.optim.Optimizer):
                inner.register_step_pre_hook(self._on_optimizer_step)

    def _on_optimizer_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        lr = optimizer.param_groups[0].get("lr") if optimizer.param_groups else None
        self._lr = float(lr) if isinstance(lr, int | float) else None

    def __call__(self, loss: Any = None, batch: Any = None, **scalars: Any) -> None:
        """One micro-batch done: ``loss`` (a tensor or float) and its ``batch``; sends the step when it ended."""
        if not self.run.active:
            return
        if isinstance(loss, torch.Tensor):
            loss = loss.detach().reshape(()) if loss.numel() == 1 else None
        if isinstance(loss, torch.Tensor | float | int):
            self._loss = loss if self._loss is None else self._loss + loss
            self._batches += 1
        if batch is not None:
            try:
                tokens = self.tokens_of(batch)
            except Exception:  # a tokens_of that does not fit a batch: no tokens, training goes on
                tokens = None
            if isinstance(tokens, int):
                self._tokens += tokens
        if not getattr(self.accelerator, "sync_gradients", True):
            return  # accumulating: the optimizer did not step
        mean = self._loss / self._batches if self._loss is not None else None
        megascope.step(loss=mean, tokens=self._tokens or None, lr=self._lr, **scalars)
        self._loss, self._batches, self._tokens = None, 0, 0
