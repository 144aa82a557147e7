"""Checkpoints of one run saved by different world sizes and layouts, for the merge tests.

One 3-process gloo job saves step 10 from 1 rank, step 20 from 2 ranks (DDP: whole tensors balanced over two
files), step 30 from 3 ranks as dim-0 shards (FSDP2's layout: every tensor split unevenly over three files)
and step 40 from 3 ranks (DDP). Each step holds different values, so a merge that mixed them up would show.
Sharded over 3 ranks, the 128-wide and 384-wide tensors split evenly; the RNG states are rank-local.
"""

from __future__ import annotations

import json
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from megascope.engine.checkpoint import Checkpointer
from megascope.engine.config import TrainConfig
from megascope.engine.data import DataConfig
from megascope.engine.model import ModelConfig, Transformer, preset
from support.checkpoint_workers import finish

MODEL = preset("tiny")
"""The tiny preset, so that `megascope train --preset tiny --init-from` can start from a merge of these."""
SAVES = ((10, 1, "ddp"), (20, 2, "ddp"), (30, 3, "fsdp2"), (40, 3, "ddp"))
"""(step, saving world size, layout)."""


def run_config(model: ModelConfig = MODEL) -> dict[str, Any]:
    config = TrainConfig(model=model, data=DataConfig(batch_tokens=256), preset="tiny", val_batches=2)
    return dict(json.loads(config.to_json()))


def state_at(step: int, model: ModelConfig = MODEL, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A model's state plus AdamW-like optimizer state, with values that depend on ``step``."""
    torch.manual_seed(step)
    net = Transformer(model)
    state = {f"model/{k}": v.to(dtype) for k, v in net.state_dict().items()}
    for name, param in net.named_parameters():
        state[f"optim/{name}/exp_avg"] = torch.randn_like(param)
        state[f"optim/{name}/exp_avg_sq"] = torch.rand_like(param)
        state[f"optim/{name}/step"] = torch.tensor(float(step))
    return state


def extra_at(step: int, world: int, model: ModelConfig = MODEL) -> dict[str, Any]:
    return {"step": step, "world_size": world, "config": run_config(model),
            "data": {"consumed": step * world, "seed": 0, "batch_tokens": 256}}  # fmt: skip


def save_series(rank: int, world: int, port: int, directory: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    groups = {3: dist.new_group(backend="gloo"), 2: dist.new_group(ranks=[0, 1], backend="gloo")}
    mesh = init_device_mesh("cpu", (world,))
    for step, saving_world, layout in SAVES:
        if rank < saving_world:
            state = state_at(step)
            if layout == "fsdp2":
                state = {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() else v for k, v in state.items()}
            checkpointer = Checkpointer(
                directory, rank, saving_world, groups.get(saving_world), layout=layout, keep_last=0
            )
            checkpointer.save(
                step, state, extra_at(step, saving_world), local={f"rng/rank{rank}/cpu": torch.get_rng_state()}
            )
            checkpointer.close()
        dist.barrier()
    finish()
