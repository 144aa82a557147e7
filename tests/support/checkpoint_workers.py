"""Worker processes for the resharding tests: real gloo process groups, real DTensors, real FSDP2."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from megascope.engine.checkpoint import Checkpointer, load
from megascope.engine.model import ModelConfig, Transformer

MODEL = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=40, max_seq_len=16)


def reference_tensors() -> dict[str, torch.Tensor]:
    """Shapes chosen so that 2, 3 and 4 ranks shard them unevenly, some ranks getting no rows at all."""
    g = torch.Generator().manual_seed(7)
    return {
        "a": torch.randn(10, 3, generator=g),
        "b": torch.randn(7, generator=g),
        "c": torch.randn(5, 2, 2, generator=g).half(),
        "one_row": torch.randn(1, 4, generator=g),
        "scalar": torch.tensor(2.5),
    }


def reference_model_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return {f"model/{k}": v for k, v in Transformer(MODEL).state_dict().items()}


def _init(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))


def finish() -> None:
    """Leave together, then exit without interpreter finalization.

    Under load, a gloo worker thread still holding a finished AsyncWork can abort the process while Python
    tears down ("terminate called without an active exception", SIGABRT; see pytorch#179291). Each worker's
    results are already on disk when this runs, so the exit status says nothing the files do not.
    """
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def _sharded(tensors: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    mesh = init_device_mesh("cpu", (world,))
    return {k: distribute_tensor(v, mesh, [Shard(0)]) if v.dim() else v for k, v in tensors.items()}


def _fsdp2_model_state(world: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    model = Transformer(MODEL)
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    return {f"model/{k}": v for k, v in model.state_dict().items()}


def save_worker(rank: int, world: int, port: int, root: str) -> None:
    """Save the tensors replicated (DDP-like) and sharded (DTensor), and a real FSDP2 and a plain model."""
    _init(rank, world, port)
    group = dist.new_group(backend="gloo")
    states = {
        "ddp": reference_tensors(),
        "dtensor": _sharded(reference_tensors(), world),
        "model_ddp": reference_model_state(),
        "model_fsdp2": _fsdp2_model_state(world),
    }
    for layout, state in states.items():
        checkpointer = Checkpointer(Path(root) / f"{layout}_by_{world}", rank, world, group, layout=layout)
        checkpointer.save(1, state)
        checkpointer.close()
    finish()


def load_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    """Load every saved checkpoint into plain tensors and into dim-0 shards; record any difference."""
    _init(rank, world, port)
    problems: list[str] = []
    for directory in sorted(Path(root).iterdir()):
        is_model = directory.name.startswith("model_")
        reference = reference_model_state() if is_model else reference_tensors()
        plain = {k: torch.zeros_like(v) for k, v in reference.items()}
        sharded = (
            _fsdp2_model_state(world)
            if is_model
            else _sharded({k: torch.zeros_like(v) for k, v in reference.items()}, world)
        )
        if is_model:
            for tensor in sharded.values():
                with torch.no_grad():
                    (tensor.to_local() if isinstance(tensor, DTensor) else tensor).zero_()
        for kind, targets in (("plain", plain), ("sharded", sharded)):
            load(directory, targets)
            for name, target in targets.items():
                got = target.full_tensor() if isinstance(target, DTensor) else target
                if not torch.equal(got, reference[name]):
                    problems.append(f"{directory.name} -> {world} ranks {kind}: {name} differs")
    Path(out, f"rank{rank}.json").write_text(json.dumps({"problems": problems}))
    finish()
