"""Which rank writes what: replicated tensors once, balanced by size; sharded tensors by their owners.

Every rank computes the same plan from the same inputs with no communication: a DDP model's state is the
same on every rank, so each knows every tensor's size. Replicated tensors are dealt largest first to the
rank that has the least to write so far (longest-processing-time first), which keeps every rank's share
within one tensor of the average. A DTensor sharded along dim 0 (FSDP2) is written by the ranks that hold
its rows, each its own rows. Rank-local tensors (a rank's RNG state) are written by their rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from megascope.engine.checkpoint.format import CheckpointError


@dataclass
class Item:
    name: str
    data: torch.Tensor
    """What this rank writes: the whole tensor, or its rows ``offset .. offset + rows``."""
    global_shape: list[int]
    offset: int
    rows: int


def _is_sharded(tensor: torch.Tensor) -> bool:
    return isinstance(tensor, DTensor) and any(isinstance(p, Shard) for p in tensor.placements)


def local_part(name: str, tensor: torch.Tensor) -> tuple[torch.Tensor, list[int], int]:
    """(local data, global shape, first global row) of a plain tensor or a dim-0-sharded DTensor."""
    if not isinstance(tensor, DTensor):
        return tensor, list(tensor.shape), 0
    for placement in tensor.placements:
        if not isinstance(placement, (Shard, Replicate)) or (isinstance(placement, Shard) and placement.dim != 0):
            raise CheckpointError(
                f"{name}: only DTensors sharded along dim 0 (or replicated) can be saved, got {tensor.placements}"
            )
    _, offsets = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return tensor.to_local(), list(tensor.shape), int(offsets[0]) if tensor.dim() else 0


def plan(
    state: dict[str, torch.Tensor], rank: int, world_size: int, local: dict[str, torch.Tensor] | None = None
) -> list[Item]:
    """The items this rank writes for ``state`` (same on every rank) and its own ``local`` tensors."""
    items: list[Item] = []
    replicated = []
    for name, tensor in state.items():
        if _is_sharded(tensor):
            data, shape, offset = local_part(name, tensor)
            if data.numel():
                items.append(Item(name, data, shape, offset, data.shape[0] if data.dim() else 1))
        else:
            data = tensor.to_local() if isinstance(tensor, DTensor) else tensor
            replicated.append((name, data))
    load = [0] * world_size
    for name, data in sorted(replicated, key=lambda item: (-item[1].numel() * item[1].element_size(), item[0])):
        owner = min(range(world_size), key=lambda r: (load[r], r))
        load[owner] += data.numel() * data.element_size()
        if owner == rank:
            items.append(Item(name, data, list(data.shape), 0, data.shape[0] if data.dim() else 1))
    for name, data in (local or {}).items():
        items.append(Item(name, data, list(data.shape), 0, data.shape[0] if data.dim() else 1))
    return items
