"""The on-disk format: data and metadata kept apart, as in ByteCheckpoint.

    CKPT_DIR/
      latest                    text: the name of the newest committed step directory
      step_00000040/            one directory per committed step
        metadata.json           every tensor: global shape, dtype, and where each shard lies
        rank0.safetensors       one plain safetensors file per writing rank
        rank1.safetensors
      step_00000050.tmp/        a save in progress (never loaded; cleaned up or reported by `ckpt ls`)

A shard is a slice of a tensor along its first dimension (whole tensors are one shard; FSDP2 shards dim 0).
For each shard the metadata names the file, the key inside it, the absolute byte range of its data in the
file, and a CRC-32 per ``BLOCK_BYTES`` block of that data, so a load that reads part of a shard still
verifies every byte it reads. A directory is committed only once ``metadata.json`` is in it and it has its
final name; ``latest`` moves after that. The files are plain safetensors: ``safetensors.safe_open`` reads
them without megascope.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

FORMAT_NAME = "megascope-checkpoint"
FORMAT_VERSION = 1
BLOCK_BYTES = 256 * 1024
LATEST = "latest"
METADATA = "metadata.json"
_STEP_DIR = re.compile(r"^step_(\d{8})$")

DTYPE_BYTES: dict[str, int] = {
    "F32": 4, "F16": 2, "BF16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
}  # fmt: skip
"""Bytes per element of each safetensors dtype name we write: known without importing torch, so that reading
metadata and streaming bytes (``megascope ckpt ls``, ``merge``) never pays torch's import time."""

_TORCH_NAMES = {
    "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64", "int64": "I64", "int32": "I32",
    "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}  # fmt: skip

if TYPE_CHECKING:
    DTYPES: dict[torch.dtype, str]
    """torch dtype -> safetensors dtype name (built on first use: it imports torch)."""
    TORCH_DTYPES: dict[str, torch.dtype]


def __getattr__(name: str) -> object:
    if name in ("DTYPES", "TORCH_DTYPES"):
        import torch

        dtypes = {getattr(torch, attr): code for attr, code in _TORCH_NAMES.items()}
        globals().update(DTYPES=dtypes, TORCH_DTYPES={code: dtype for dtype, code in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used as asked; the message names the file or tensor and what is wrong."""


@dataclass
class Shard:
    file: str
    key: str
    """The tensor's name inside the safetensors file."""
    offset: int
    """First row (along dim 0) of the global tensor this shard holds."""
    rows: int
    byte_start: int
    """Absolute position of the shard's data in the file."""
    byte_end: int
    crc32: list[int] = field(default_factory=list)
    """CRC-32 of each BLOCK_BYTES block of the data, the last block possibly shorter."""


@dataclass
class TensorMeta:
    shape: list[int]
    dtype: str
    shards: list[Shard]

    def row_bytes(self) -> int:
        elements = 1
        for size in self.shape[1:]:
            elements *= size
        return elements * DTYPE_BYTES[self.dtype]


@dataclass
class Metadata:
    step: int
    world_size: int
    layout: str
    """How the saving job held the state: "ddp" (replicated), "fsdp2" (dim-0 shards) or "single"."""
    tensors: dict[str, TensorMeta]
    files: dict[str, int]
    """Every data file and its exact size in bytes."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Anything JSON the caller saved beside the tensors: run config, data position, step, ..."""
    created: float = 0.0
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str, where: Path) -> Metadata:
        try:
            raw = json.loads(text)
            if raw.get("format") != FORMAT_NAME:
                raise CheckpointError(f"{where}: not a megascope checkpoint (format {raw.get('format')!r})")
            if raw.get("version") != FORMAT_VERSION:
                raise CheckpointError(f"{where}: format version {raw.get('version')} is not {FORMAT_VERSION}")
            tensors = {
                name: TensorMeta(t["shape"], t["dtype"], [Shard(**s) for s in t["shards"]])
                for name, t in raw.pop("tensors").items()
            }
            return cls(tensors=tensors, **raw)
        except CheckpointError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: damaged metadata ({type(error).__name__}: {error})") from None

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def committed_steps(directory: Path) -> list[int]:
    """Steps with a committed directory (final name and metadata present), oldest first."""
    if not directory.is_dir():
        return []
    steps = []
    for entry in directory.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and (entry / METADATA).is_file():
            steps.append(int(match.group(1)))
    return sorted(steps)


def resolve(path: Path) -> Path:
    """A step directory from either a step directory or a checkpoint root (then its ``latest``)."""
    if path.name.endswith(".tmp"):  # even with its metadata written, it is not committed until renamed
        raise CheckpointError(f"{path} is an unfinished save (no commit); it is never loaded")
    if (path / METADATA).is_file():
        return path
    latest = path / LATEST
    if latest.is_file():
        target = path / latest.read_text().strip()
        if not (target / METADATA).is_file():
            raise CheckpointError(f"{latest} points to {target.name}, which is not a committed checkpoint")
        return target
    raise CheckpointError(f"{path}: no checkpoint here (no {METADATA} and no {LATEST} pointer)")


def read_metadata(step_dir: Path) -> Metadata:
    path = step_dir / METADATA
    try:
        return Metadata.from_json(path.read_text(), path)
    except FileNotFoundError:
        raise CheckpointError(f"{step_dir}: no {METADATA}; the save never committed") from None


def open_checkpoint(path: str | Path) -> tuple[Path, Metadata]:
    """The step directory and its metadata, after checking every data file is there with its full size."""
    step_dir = resolve(Path(path))
    metadata = read_metadata(step_dir)
    for file, size in metadata.files.items():
        actual = (step_dir / file).stat().st_size if (step_dir / file).exists() else None
        if actual is None:
            raise CheckpointError(f"{step_dir / file}: missing (the metadata lists it with {size} bytes)")
        if actual != size:
            raise CheckpointError(f"{step_dir / file}: {actual} bytes, the metadata says {size}: truncated or replaced")
    return step_dir, metadata


def block_crcs(data: memoryview) -> list[int]:
    return [zlib.crc32(data[i : i + BLOCK_BYTES]) for i in range(0, len(data), BLOCK_BYTES)]


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, text: str) -> None:
    """Write, fsync, rename over ``path``, fsync the directory: readers see the old or the new file whole."""
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, path)
    fsync_dir(path.parent)
