"""Loading with resharding: each rank reads only the byte ranges of the rows it needs.

The target decides the layout: a plain tensor wants every row; a DTensor sharded along dim 0 (FSDP2) wants
its own rows. For each saved shard that overlaps, the loader reads the overlapping rows (widened to whole
checksum blocks, each verified) and copies them in. So a checkpoint saved by N ranks loads into M ranks,
DDP into FSDP2 and back, or into one process, and a damaged byte is an error naming the file and tensor,
never a silently wrong weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from megascope.engine.checkpoint.format import TORCH_DTYPES, CheckpointError, Metadata, open_checkpoint
from megascope.engine.checkpoint.safetensors_io import read_rows


@dataclass
class LoadStats:
    bytes_read: int = 0
    bytes_needed: int = 0
    """The bytes of the rows the targets asked for; ``bytes_read / bytes_needed`` is the read amplification."""


def load(path: str | Path, targets: dict[str, torch.Tensor], strict: bool = True) -> tuple[Metadata, LoadStats]:
    """Fill ``targets`` (plain tensors or dim-0-sharded DTensors, any device) from the checkpoint at ``path``.

    ``path`` is a step directory or a checkpoint root (its ``latest``). With ``strict``, every target must be
    in the checkpoint. Raises CheckpointError naming the first tensor that is missing or does not match.
    """
    step_dir, metadata = open_checkpoint(path)
    stats = LoadStats()
    for name, target in targets.items():
        meta = metadata.tensors.get(name)
        if meta is None:
            if strict:
                raise CheckpointError(f"{name}: not in the checkpoint at {step_dir}")
            continue
        if type(target) in (torch.Tensor, torch.nn.Parameter):
            local, shape, offset = target, list(target.shape), 0
        else:  # a DTensor: import its machinery (torch.distributed.tensor, slow to import) only when there is one
            from megascope.engine.checkpoint.plan import local_part

            local, shape, offset = local_part(name, target)
        if shape != meta.shape:
            raise CheckpointError(
                f"{name}: the checkpoint has shape {tuple(meta.shape)}, the target wants {tuple(shape)}"
            )
        if TORCH_DTYPES[meta.dtype] != local.dtype:
            raise CheckpointError(f"{name}: the checkpoint has dtype {meta.dtype}, the target wants {local.dtype}")
        _fill(step_dir, name, meta.shards, meta.dtype, meta.shape, local, offset, stats)
    return metadata, stats


def _fill(
    step_dir: Path,
    name: str,
    shards: list,
    dtype: str,
    shape: list[int],
    local: torch.Tensor,  # type: ignore[type-arg]
    offset: int,
    stats: LoadStats,
) -> None:
    scalar = len(shape) == 0
    rows = 1 if scalar else local.shape[0]
    row_shape = [] if scalar else shape[1:]
    covered = 0
    counter = [0]
    for shard in shards:
        first = max(offset, shard.offset)
        last = min(offset + rows, shard.offset + shard.rows)
        if last <= first:
            continue
        target = local.reshape([1]) if scalar else local[first - offset : last - offset]
        data = read_rows(step_dir, name, shard, dtype, row_shape, first, last - first, counter, into=target)
        if data is not target:  # read_rows filled ``target`` itself when it could
            with torch.no_grad():
                target.copy_(data.reshape(target.shape))
        covered += last - first
    if covered != rows:
        raise CheckpointError(
            f"{name}: the checkpoint's shards cover {covered} of the {rows} rows needed (shard missing)"
        )
    stats.bytes_read += counter[0]
    stats.bytes_needed += local.numel() * local.element_size()


def read_tensor(step_dir: Path, metadata: Metadata, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """One whole tensor of an opened checkpoint (``open_checkpoint``), from all its shards, every block checked.

    ``out`` (CPU, the tensor's shape and stored dtype) is filled and returned when given, so a caller that
    streams a checkpoint tensor by tensor can reuse one buffer.
    """
    meta = metadata.tensors.get(name)
    if meta is None:
        raise CheckpointError(f"{name}: not in the checkpoint at {step_dir}")
    if out is None:
        out = torch.empty(meta.shape, dtype=TORCH_DTYPES[meta.dtype])
    elif list(out.shape) != meta.shape or out.dtype != TORCH_DTYPES[meta.dtype]:
        raise CheckpointError(
            f"{name}: the checkpoint has {meta.dtype} {meta.shape}, the buffer is {out.dtype} {list(out.shape)}"
        )
    _fill(step_dir, name, meta.shards, meta.dtype, meta.shape, out, 0, LoadStats())
    return out


def load_state(path: str | Path, names: list[str] | None = None) -> tuple[dict[str, torch.Tensor], Metadata]:
    """Whole tensors in one process (inspection, evaluation, merging): ``names`` or every tensor."""
    step_dir, metadata = open_checkpoint(path)
    wanted = names if names is not None else list(metadata.tensors)
    tensors = {}
    for name in wanted:
        meta = metadata.tensors.get(name)
        if meta is None:
            raise CheckpointError(f"{name}: not in the checkpoint at {step_dir}")
        tensors[name] = torch.empty(meta.shape, dtype=TORCH_DTYPES[meta.dtype])
    load(step_dir, tensors)
    return tensors, metadata


def verify(path: str | Path) -> Metadata:
    """Read every byte of every shard and check it against its checksum; raises on the first damage."""
    step_dir, metadata = open_checkpoint(path)
    for name, meta in metadata.tensors.items():
        row_shape = meta.shape[1:] if meta.shape else []
        for shard in meta.shards:
            if shard.file not in metadata.files:
                raise CheckpointError(f"{name}: its shard is in {shard.file}, which the metadata does not list")
            read_rows(step_dir, name, shard, meta.dtype, row_shape, shard.offset, shard.rows)
        covered = sum(s.rows for s in meta.shards)
        expected = meta.shape[0] if meta.shape else 1
        if covered != expected:
            raise CheckpointError(f"{name}: shards cover {covered} of {expected} rows (a shard is missing)")
    return metadata
