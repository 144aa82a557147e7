"""Launch a node's training ranks through torch elastic, the machinery behind ``torchrun``.

Rendezvous is c10d (single node: an ephemeral store on 127.0.0.1; many nodes: the same ``--rdzv-endpoint``
and ``--rdzv-id`` on every node). ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` makes each restart attempt build a
fresh store for its process group: with the store shared, restarted workers can read the previous
attempt's gloo addresses and fail or hang (pytorch/pytorch#135712).
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.launcher.api import LaunchConfig, elastic_launch

from megascope.engine.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class LaunchOptions:
    nproc_per_node: int = 1
    nnodes: str = "1"
    """``N`` or ``MIN:MAX`` (elastic)."""
    rdzv_endpoint: str | None = None
    """``HOST:PORT`` of the c10d rendezvous; None for a single node on an ephemeral local port."""
    rdzv_id: str | None = None
    max_restarts: int = 0
    monitor_interval: float = 0.5

    def node_range(self) -> tuple[int, int]:
        try:
            low, _, high = self.nnodes.partition(":")
            lo, hi = int(low), int(high or low)
        except ValueError:
            raise ConfigError(f"--nnodes must be N or MIN:MAX, got {self.nnodes!r}") from None
        if lo < 1 or hi < lo:
            raise ConfigError(f"--nnodes must satisfy 1 <= MIN <= MAX, got {self.nnodes!r}")
        return lo, hi

    def validate(self) -> None:
        if self.nproc_per_node < 1:
            raise ConfigError(f"--nproc-per-node must be at least 1, got {self.nproc_per_node}")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts must be >= 0, got {self.max_restarts}")
        _, max_nodes = self.node_range()
        if max_nodes > 1 and not self.rdzv_endpoint:
            raise ConfigError("--nnodes above 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")


class LaunchFailed(RuntimeError):
    """A rank failed after the allowed restarts; the message says which and how."""


def write_config(config: TrainConfig) -> Path:
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "config.json"
    path.write_text(config.to_json())
    return path


def launch(config: TrainConfig, options: LaunchOptions) -> None:
    """Run the ranks of this node until training ends; raises LaunchFailed when a rank fails for good."""
    options.validate()
    min_nodes, max_nodes = options.node_range()
    config_path = write_config(config)
    os.environ["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"
    # As torchrun does: without it every rank starts one BLAS thread per core and they fight for the cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // options.nproc_per_node)))
    launch_config = LaunchConfig(
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        nproc_per_node=options.nproc_per_node,
        run_id=options.rdzv_id or uuid.uuid4().hex,
        rdzv_backend="c10d",
        rdzv_endpoint=options.rdzv_endpoint or "127.0.0.1:0",
        max_restarts=options.max_restarts,
        monitor_interval=options.monitor_interval,
        logs_specs=DefaultLogsSpecs(log_dir=str(Path(config.run_dir) / "logs")),
    )
    try:
        elastic_launch(launch_config, sys.executable)("-m", "megascope.engine.trainer", str(config_path.resolve()))
    except ChildFailedError as error:
        lines = []
        for rank, failure in sorted(error.failures.items()):
            lines.append(f"rank {rank} (pid {failure.pid}) exited with code {failure.exitcode}")
        raise LaunchFailed("; ".join(lines) + f"; logs under {Path(config.run_dir) / 'logs'}") from None
