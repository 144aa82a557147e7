"""The whole configuration of a training run, as nested dataclasses that round-trip through JSON.

The launcher writes it to ``<run_dir>/config.json``; every rank reads the same file, so all ranks agree on
everything, and the file stays behind as a record of the run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from megascope.engine.data import DataConfig
from megascope.engine.model import ModelConfig
from megascope.engine.runtime.faults import Fault, fault_from_dict


class ConfigError(ValueError):
    """A bad setting; the message names the flag to change."""


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-3
    """Peak learning rate, held constant after warmup (the schedule checkpoint merging wants)."""
    warmup_steps: int = 20
    decay_steps: int = 0
    """Optional linear decay to ``min_lr_ratio * lr`` over the last this-many steps (0: no decay)."""
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.warmup_steps < 0 or self.decay_steps < 0:
            raise ConfigError("--warmup-steps and --decay-steps must be >= 0")
        if self.grad_clip < 0:
            raise ConfigError(f"--grad-clip must be >= 0, got {self.grad_clip}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"--min-lr-ratio must be in [0, 1], got {self.min_lr_ratio}")

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate for 1-based ``step``: linear warmup, constant, then optional linear decay."""
        if self.warmup_steps and step <= self.warmup_steps:
            return self.lr * step / self.warmup_steps
        decay_start = total_steps - self.decay_steps
        if self.decay_steps and step > decay_start:
            progress = (step - decay_start) / self.decay_steps
            return self.lr * (1.0 - (1.0 - self.min_lr_ratio) * progress)
        return self.lr


@dataclass(frozen=True)
class CheckpointConfig:
    dir: str | None = None
    """Where checkpoints go; None saves none. A run given a directory with checkpoints resumes from the newest."""
    every: int = 0
    """Save every this-many steps (0: only at the end of training)."""
    keep_last: int = 3
    """Keep the newest this-many checkpoints (0: keep all)."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this (0: none extra)."""
    resume: bool = True
    """Resume from the newest complete checkpoint in ``dir`` when there is one."""
    init_from: str | None = None
    """PMA-init: start from the model weights of this checkpoint (a merge's output, or any checkpoint) when
    ``dir`` has nothing to resume from; the run keeps its own step count, schedule and data order."""
    init_optimizer: Literal["fresh", "keep"] = "fresh"
    """With ``init_from``: a fresh optimizer, or the optimizer state saved in it (``merge --keep-optimizer``)."""

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 0 or self.keep_every < 0:
            raise ConfigError("--ckpt-every, --ckpt-keep and --ckpt-keep-every must be >= 0")
        if self.init_optimizer not in ("fresh", "keep"):
            raise ConfigError(f"--init-optimizer must be fresh or keep, got {self.init_optimizer!r}")


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    preset: str = "tiny"
    steps: int = 100
    """Optimizer steps to train for."""
    grad_accum: int = 1
    """Micro-batches per optimizer step on each rank."""
    val_every: int = 50
    """Validation loss every this-many steps and at the end (0: only at the end)."""
    val_batches: int = 4
    """Validation micro-batches per rank each time."""
    log_every: int = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"
    peak_tflops: float | None = None
    """Override the device peak used for MFU."""
    kernels: Literal["auto", "triton", "torch"] = "auto"
    """Fused Triton kernels or the PyTorch references (``--kernels``); auto: Triton on CUDA, PyTorch on CPU."""
    run_dir: str = "runs/latest"
    """Where the config, telemetry (one JSONL file per rank) and logs go."""
    dist_timeout_seconds: float = 300.0
    """Process group timeout (``--collective-timeout``); a collective stuck longer than this fails instead of hanging
    forever. The agent's hang detection (``--hang-timeout``) acts well before it. With in-place recovery it also
    bounds how long a broken group's collective that gloo never fails holds its threads and sockets after the
    recovery (engine/recovery.py, destroy_groups)."""
    self_check: bool = True
    """Run the node self-check (engine/runtime/selfcheck.py) at every start of the ranks, before training."""
    faults: tuple[Fault, ...] = ()
    """Injected faults (``--inject``), for testing the diagnosis; empty in a real run."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps must be at least 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ConfigError(f"--grad-accum must be at least 1, got {self.grad_accum}")
        if self.val_every < 0 or self.val_batches < 0:
            raise ConfigError("--val-every and --val-batches must be >= 0")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if not 0 < self.dist_timeout_seconds < float("inf"):
            raise ConfigError(
                f"--collective-timeout must be a positive number of seconds, got {self.dist_timeout_seconds}"
            )
        if self.peak_tflops is not None and self.peak_tflops <= 0:
            raise ConfigError(f"--peak-tflops must be positive, got {self.peak_tflops}")
        if self.kernels not in ("auto", "triton", "torch"):
            raise ConfigError(f"--kernels must be auto, triton or torch, got {self.kernels!r}")
        if self.kernels == "triton" and self.device == "cpu":
            raise ConfigError("--kernels triton needs a GPU (--device cuda or auto); use --kernels torch on CPU")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        values = dict(values)
        return cls(
            model=ModelConfig.from_dict(values.pop("model")),
            data=DataConfig(**values.pop("data")),
            optim=OptimConfig(**values.pop("optim")),
            checkpoint=CheckpointConfig(**values.pop("checkpoint", {})),
            faults=tuple(fault_from_dict(f) for f in values.pop("faults", ())),
            **values,
        )

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text()))
