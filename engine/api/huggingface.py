"""megascope for a Hugging Face ``Trainer``: one callback.

::

    from megascope.api.huggingface import MegascopeCallback

    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[MegascopeCallback()])

Every optimizer step of every rank is reported (``step`` is ``state.global_step``, so it continues across a
resume), with:

- ``loss``: this rank's loss of this very step, whatever ``logging_steps`` is. The Trainer only logs a loss every
  ``logging_steps``, averaged over the steps and the ranks, and keeps the per-step value private; so the callback
  reads it where the Trainer gets it, from the model's output (a forward hook on the model the callback is given).
  It sums the micro-batches of a step as the Trainer does for its own log (a mean when the loss is a per-batch
  mean, a sum when the model normalised it by the accumulated batch's token count), so with ``logging_steps=1``
  on one rank it equals the logged ``loss``. The loss tensor is read on megascope's thread, never with
  ``.item()`` in the loop. A model that returns no loss (a custom ``compute_loss`` or ``compute_loss_func``)
  leaves ``loss`` out.
- ``tokens``: the ``input_ids`` (or ``inputs_embeds``) positions the model ran on, padding included (counting
  the attention mask would cost a device sync every micro-batch).
- ``lr``: the learning rate the optimizer step used; ``grad_norm``: the Trainer's pre-clipping norm, on logging
  steps only (it is computed inside the Trainer and only handed to its log).
- the step time, split into the wait for the step's batches (``data``: from the Trainer's last event of the previous
  step, its log, save or evaluation, to the start of this one; on several ranks this includes the Trainer's
  all-gather of the batches' token count) and the rest.

Commands from the dashboard are carried out at a step boundary: "save a checkpoint" sets ``should_save`` (the
Trainer's own checkpoint, in ``output_dir``), "stop" sets ``should_training_stop``.

Outside ``megascope agent`` (no ``MEGASCOPE_AGENT_ADDRESS``, no ``MEGASCOPE_RUN_DIR``) the callback does nothing
but a few attribute reads per step. ``torch.nn.DataParallel`` (several GPUs in one process) is not supported:
launch one process per GPU (``torchrun``, ``accelerate launch``), as the Trainer recommends.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import megascope.api as megascope
from megascope.protos.megascope.v1 import worker_pb2

__all__ = ["MegascopeCallback"]


class MegascopeCallback(TrainerCallback):
    """Reports each optimizer step of a ``transformers.Trainer`` to megascope; see the module docstring."""

    def __init__(self) -> None:
        self._run: megascope.Run | None = None
        self._hook: torch.utils.hooks.RemovableHandle | None = None
        self._loss: torch.Tensor | None = None
        self._loss_is_sum = False
        self._micro_batches = 0
        self._tokens = 0
        self._lr: float | None = None
        self._world_size = 1
        self._average_tokens = False
        self._data: Any = None
        self._pending = False
        self._saves: set[int] = set()
        self._stops: set[int] = set()

    # -- the Trainer's events --------------------------------------------------------------------------------------

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._run = megascope.init(handle_commands=True)
        if not self._run.active:
            return
        self._world_size = max(1, int(args.world_size))
        self._average_tokens = bool(getattr(args, "average_tokens_across_devices", False))
        model = kwargs.get("model")
        if isinstance(model, torch.nn.Module) and self._hook is None:
            self._hook = model.register_forward_hook(self._on_forward, with_kwargs=True)
        self._start_data_wait()

    def on_step_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if self._run is None or not self._run.active:
            return
        self._flush(state)  # a step whose log never came (it cannot happen in 5.x, but a report is never lost)
        if self._data is not None:
            # The Trainer fetches all of a step's micro-batches just before this event.
            self._data.__exit__(None, None, None)
            self._data = None
        self._loss = None
        self._micro_batches = 0
        self._tokens = 0
        self._lr = None

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # After optimizer.step(), before the scheduler's: the learning rate this step used.
        optimizer = kwargs.get("optimizer")
        groups = getattr(optimizer, "param_groups", None)
        if groups:
            lr = groups[0].get("lr")
            self._lr = float(lr) if isinstance(lr, int | float) else None

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if self._run is None or not self._run.active:
            return
        self._take_commands(args, state, control)
        if control.should_log:
            # The Trainer logs this step right after this event, with the gradient norm it keeps to itself.
            self._pending = True
        else:
            self._report(state, grad_norm=None)
        self._start_data_wait()

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if not self._pending:
            return
        grad_norm = (logs or {}).get("grad_norm")
        self._report(state, grad_norm=grad_norm if isinstance(grad_norm, int | float) else None)
        self._start_data_wait()

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._start_data_wait()

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._start_data_wait()

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._flush(state)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._data = None
        # Not finish(): the script may still evaluate or save after train(); the API reports "finished" at exit.

    # -- what the callback measures --------------------------------------------------------------------------------

    def _on_forward(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if not module.training or not torch.is_grad_enabled():
            return  # evaluation or prediction, not a training micro-batch
        if isinstance(output, Mapping):
            loss = output.get("loss")
        elif isinstance(output, tuple) and output and "labels" in kwargs:
            loss = output[0]  # return_dict=False: the loss comes first when labels were given
        else:
            loss = None
        if isinstance(loss, torch.Tensor) and loss.numel() == 1:
            loss = loss.detach().reshape(())
            self._loss = loss if self._loss is None else self._loss + loss
            self._micro_batches += 1
            self._loss_is_sum = kwargs.get("num_items_in_batch") is not None
        ids = kwargs.get("input_ids", args[0] if args else None)
        if not isinstance(ids, torch.Tensor):
            ids = kwargs.get("inputs_embeds")
            ids = ids[..., 0] if isinstance(ids, torch.Tensor) else None
        if isinstance(ids, torch.Tensor):
            self._tokens += ids.numel()

    def _step_loss(self) -> torch.Tensor | None:
        loss = self._loss
        if loss is None:
            return None
        if not self._loss_is_sum:
            return loss / self._micro_batches  # per-batch means: the Trainer divides each by the accumulation
        if self._average_tokens and self._world_size > 1:
            # Normalised by the token count of all ranks: the Trainer scales it back by the number of processes.
            return loss * self._world_size
        return loss

    def _report(self, state: TrainerState, grad_norm: float | None) -> None:
        self._pending = False
        megascope.step(
            loss=self._step_loss(), tokens=self._tokens or None, lr=self._lr, grad_norm=grad_norm,
            step=int(state.global_step),
        )  # fmt: skip
        self._loss = None
        self._micro_batches = 0
        self._tokens = 0

    def _flush(self, state: TrainerState) -> None:
        if self._pending:
            self._report(state, grad_norm=None)

    def _start_data_wait(self) -> None:
        # Logging, saving and evaluating end with their own event; the batches are fetched after the last one of
        # them. A phase that is entered again before it is left adds nothing: only the last start counts.
        if self._run is None or not self._run.active:
            return
        self._data = megascope.phase("data")
        self._data.__enter__()

    # -- commands from the dashboard -------------------------------------------------------------------------------

    def _take_commands(self, args: TrainingArguments, state: TrainerState, control: TrainerControl) -> None:
        assert self._run is not None
        done = int(state.global_step)
        for command in self._run.pending_commands():
            at = command.step or done
            if command.kind == worker_pb2.COMMAND_KIND_CHECKPOINT and at >= done:
                self._saves.add(at)
                self._run.answer(
                    command, True, f"will save after step {at} (the Trainer's checkpoint, in {args.output_dir})"
                )
            elif command.kind == worker_pb2.COMMAND_KIND_STOP and at >= done:
                self._stops.add(at)
                self._run.answer(command, True, f"will stop after step {at}")
            elif at < done:
                self._run.answer(command, False, f"step {at} is already done (this rank is at step {done})")
            else:
                self._run.answer(command, False, f"unknown command kind {command.kind}")
        if done in self._saves:
            self._saves.discard(done)
            control.should_save = True
        if done in self._stops:
            self._stops.discard(done)
            control.should_training_stop = True
