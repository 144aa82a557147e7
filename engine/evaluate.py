"""Validation loss of a checkpoint's model in this one process: no torch.distributed, no launcher.

The trainer's ``validate`` has rank ``r`` of ``W`` take validation micro-batches ``i * W + r`` for
``i < val_batches`` and averages the per-batch losses over all ranks: that is the mean over micro-batches
``0 .. val_batches * W - 1`` of the run's (unshuffled) validation stream. The evaluator takes exactly those
batches, built from the run's own config (data source, split, seed, batch size, sequence length), so the
number it gives for a checkpoint is the number the run logged at that step (up to summation order), and
checkpoints of one run, merged or not, are compared on the same tokens.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

import torch

from megascope.engine.checkpoint import Metadata, load, open_checkpoint
from megascope.engine.config import CheckpointConfig, OptimConfig, TrainConfig
from megascope.engine.data import Batch, DataConfig, DataError, PackedBatches, load_corpus, split_train_val
from megascope.engine.model import Transformer, cross_entropy


def _known(values: dict[str, Any], kind: type) -> dict[str, Any]:
    names = {f.name for f in fields(kind)}
    return {k: v for k, v in values.items() if k in names}


class EvalError(ValueError):
    """A checkpoint that cannot be evaluated; the message says why and what to change."""


def run_config(metadata: Metadata, where: Path) -> TrainConfig:
    """The training config saved in a checkpoint's metadata (``extra.config``).

    Settings this version does not know (saved by a newer or older megascope) are dropped, except in the model
    section: evaluation needs the data, split and batch settings, and the model exactly.
    """
    try:
        raw = dict(metadata.extra["config"])
        for section, kind in (("data", DataConfig), ("optim", OptimConfig), ("checkpoint", CheckpointConfig)):
            if isinstance(raw.get(section), dict):
                raw[section] = _known(raw[section], kind)
        return TrainConfig.from_dict(_known(raw, TrainConfig))
    except (KeyError, TypeError, ValueError) as error:
        raise EvalError(
            f"{where}: no usable training config in its metadata ({type(error).__name__}: {error}); "
            "checkpoints saved by `megascope train` have one"
        ) from None


class Evaluator:
    """Validation loss of checkpoints of one run on that run's validation batches (see the module docstring)."""

    def __init__(
        self, config: TrainConfig, world_size: int, val_batches: int | None = None, device: str = "auto"
    ) -> None:
        """``world_size``: the training run's (it decides which batches its validation used);
        ``val_batches``: per rank, default the run's ``--val-batches``."""
        per_rank = config.val_batches if val_batches is None else val_batches
        if per_rank < 1:
            raise EvalError(f"validation needs at least one batch per rank, got {per_rank} (--val-batches)")
        _, val_docs = split_train_val(load_corpus(config.data.path), config.data.val_fraction)
        if not len(val_docs) or val_docs.num_tokens < config.data.batch_tokens:
            raise EvalError(
                f"the run's held-out documents ({val_docs.num_tokens} tokens) are fewer than one micro-batch of "
                f"{config.data.batch_tokens} tokens: no validation loss (the run was trained with "
                f"--val-fraction {config.data.val_fraction})"
            )
        try:
            stream = PackedBatches(
                val_docs, config.data.batch_tokens, config.model.max_seq_len, config.data.seed, shuffle=False
            )
        except DataError as error:
            raise EvalError(str(error)) from None
        self.batches: list[Batch] = [stream.batch_at(i) for i in range(per_rank * world_size)]
        use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda" if use_cuda else "cpu")
        # As the trainer: bf16 autocast on a GPU, plain fp32 on a CPU; Triton kernels only where they can run.
        self.autocast = use_cuda
        kernels = config.kernels if use_cuda else "torch"
        self.model = Transformer(config.model, kernels=kernels).to(self.device).eval()

    @classmethod
    def for_checkpoint(cls, path: str | Path, val_batches: int | None = None, device: str = "auto") -> Evaluator:
        """An evaluator on the validation batches of the run that saved the checkpoint at ``path``."""
        step_dir, metadata = open_checkpoint(path)
        config = run_config(metadata, step_dir)
        world_size = int(metadata.extra.get("world_size", metadata.world_size))
        return cls(config, world_size, val_batches, device)

    @torch.no_grad()
    def loss(self, path: str | Path) -> float:
        """Mean validation loss of the model in the checkpoint at ``path`` (a step directory or a root)."""
        targets = {f"model/{name}": tensor for name, tensor in self.model.state_dict().items()}
        load(path, targets)
        total = 0.0
        for batch in self.batches:
            batch = batch.to(self.device)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                logits = self.model(batch.tokens, batch.cu_seqlens, batch.max_seqlen)
            total += cross_entropy(logits, batch.targets).item()
        return total / len(self.batches)


def validation_loss(path: str | Path, val_batches: int | None = None, device: str = "auto") -> float:
    """The validation loss of one checkpoint's model on its own run's validation batches."""
    return Evaluator.for_checkpoint(path, val_batches, device).loss(path)
