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
    headers: dict[str, int] = field(default_factory=dict)
    """CRC-32 of each data file's safetensors header (its first 8 bytes and the JSON after them), so that every
    byte of a file is checksummed. Absent in checkpoints written before it existed: those are still read, and
    their headers are checked against the metadata's tensors instead (see :func:`check_header`)."""
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
            metadata = cls(tensors=tensors, **raw)
        except CheckpointError:
            raise
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise CheckpointError(f"{where}: damaged metadata ({type(error).__name__}: {error})") from None
        metadata._confine(where)
        return metadata

    def _confine(self, where: Path) -> None:
        """Every file the metadata names is a plain file name inside the checkpoint's own directory (a name such
        as ``../../outside/r1.safetensors`` would make verify, load and merge read another directory's files)."""
        if not isinstance(self.files, dict) or not all(isinstance(v, int) for v in self.files.values()):
            raise CheckpointError(f"{where}: damaged metadata (files: not a map of names to sizes)")
        names = [*self.files, *self.headers, *(s.file for t in self.tensors.values() for s in t.shards)]
        for name in names:
            if not is_plain_name(name):
                raise CheckpointError(f"{where}: names the file {name!r}, outside the checkpoint's directory; refused")
        for tensor_name, tensor in self.tensors.items():
            if tensor.dtype not in DTYPE_BYTES:
                raise CheckpointError(f"{where}: {tensor_name}: unknown dtype {tensor.dtype!r}")
            for shard in tensor.shards:
                if shard.file not in self.files:
                    raise CheckpointError(
                        f"{where}: {tensor_name}: its shard is in {shard.file}, which the metadata does not list"
                    )

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_plain_name(name: object) -> bool:
    """A bare file name: no directory part, not ``.`` or ``..``, no NUL (what metadata.json may name)."""
    return (
        isinstance(name, str) and bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
        and "\0" not in name
    )  # fmt: skip


def read_latest(directory: Path) -> str | None:
    """The step directory name ``latest`` holds (None without a ``latest``); raises CheckpointError when it holds
    anything but a step directory name of this checkpoint root (an absolute path, or one into another run)."""
    path = directory / LATEST
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        return None
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: not a step directory name (damaged)") from None
    if not _STEP_DIR.match(text):
        shown = text if len(text) <= 80 else text[:77] + "..."
        raise CheckpointError(f"{path} holds {shown!r}, not a step directory of {directory} (step_NNNNNNNN); refused")
    return text


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
        name = read_latest(path)
        target = path / str(name)
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
    except UnicodeDecodeError:
        raise CheckpointError(f"{path}: damaged metadata (not text)") from None


def check_sizes(step_dir: Path, metadata: Metadata) -> None:
    """Every data file the metadata lists is there with its exact size."""
    for file, size in metadata.files.items():
        try:
            actual = (step_dir / file).stat().st_size
        except FileNotFoundError:
            raise CheckpointError(f"{step_dir / file}: missing (the metadata lists it with {size} bytes)") from None
        if actual != size:
            raise CheckpointError(f"{step_dir / file}: {actual} bytes, the metadata says {size}: truncated or replaced")


def header_bytes(path: Path) -> bytes:
    """A safetensors file's header: the 8-byte length and the JSON it announces (CheckpointError if it cannot be)."""
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: damaged safetensors header (file shorter than 8 bytes)")
        length = int.from_bytes(prefix, "little")
        if length > _MAX_HEADER_BYTES or length > os.fstat(f.fileno()).st_size - 8:
            raise CheckpointError(f"{path}: damaged safetensors header (announces {length} bytes of header)")
        return prefix + f.read(length)


_MAX_HEADER_BYTES = 100 << 20
"""safetensors' own limit on a header's size."""


def check_header(step_dir: Path, metadata: Metadata, file: str) -> None:
    """The file's safetensors header is the one written: its CRC-32 when the metadata has it, and in any case a
    header that parses and places each of the metadata's shards in this file where the metadata says."""
    path = step_dir / file
    raw = header_bytes(path)
    expected = metadata.headers.get(file)
    if expected is not None and zlib.crc32(raw) != expected:
        raise CheckpointError(f"{path}: checksum mismatch in the safetensors header; the file is damaged")
    try:
        header = json.loads(raw[8:])
        data_start = len(raw)
        for name, tensor in metadata.tensors.items():
            for shard in tensor.shards:
                if shard.file != file:
                    continue
                entry = header[shard.key]
                start, end = (data_start + int(o) for o in entry["data_offsets"])
                shape = [shard.rows, *tensor.shape[1:]] if tensor.shape else []
                placed = (start, end) == (shard.byte_start, shard.byte_end)
                if not placed or entry["dtype"] != tensor.dtype or list(entry["shape"]) != shape:
                    raise CheckpointError(f"{path}: the safetensors header disagrees with the metadata on {name}")
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise CheckpointError(f"{path}: damaged safetensors header ({type(error).__name__}: {error})") from None


def open_checkpoint(path: str | Path) -> tuple[Path, Metadata]:
    """The step directory and its metadata, after checking every data file is there with its full size and the
    header it was written with (a load then checks the CRC of every block it reads)."""
    step_dir = resolve(Path(path))
    metadata = read_metadata(step_dir)
    check_sizes(step_dir, metadata)
    for file in metadata.files:
        check_header(step_dir, metadata, file)
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
