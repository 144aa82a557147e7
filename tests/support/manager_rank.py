"""One rank as the trainer drives its :class:`CheckpointManager`, in this process: a model, its optimizer, the data
position and where events go. Shared by the checkpoint unit tests and ``bench/probe``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from megascope.engine.checkpoint.manager import CheckpointManager
from megascope.engine.config import CheckpointConfig, TrainConfig
from megascope.protos.megascope.v1 import telemetry_pb2


class FakeData:
    """The data loader's position, as the manager restores it."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = state


class Rank:
    """What a trainer hands its manager: a model, its optimizer, the data, and where events go.

    The model is ``Linear(*features)`` with initial weights from ``seed``; ``checkpoint`` holds the
    :class:`CheckpointConfig` fields (``dir`` by default ``tmp_path / "ckpt"``); the run directory is
    ``tmp_path / "run"``."""

    def __init__(
        self, tmp_path: Path, steps: int = 6, seed: int = 0, features: tuple[int, int] = (4, 3), **checkpoint: Any
    ) -> None:
        checkpoint.setdefault("dir", str(tmp_path / "ckpt"))
        self.config = TrainConfig(steps=steps, run_dir=str(tmp_path / "run"), checkpoint=CheckpointConfig(**checkpoint))
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(*features)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=0.1)
        self.data = FakeData()
        self.events: list[telemetry_pb2.Event] = []
        self.manager = CheckpointManager(self.config, self.model, self.optimizer, self.data, emit=self.events.append)

    def train_step(self) -> None:
        self.model(torch.ones(2, self.model.in_features)).sum().backward()
        self.manager.before_optimizer_step()
        self.optimizer.step()
        self.optimizer.zero_grad()

    def run(self, steps: range) -> None:
        """Train and save as the trainer does, then wait for the last save."""
        for step in steps:
            self.train_step()
            self.manager.save(step, {"consumed": step})
        self.manager.close()

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]

    def of_kind(self, kind: str) -> list[telemetry_pb2.Event]:
        return [event for event in self.events if event.kind == kind]
