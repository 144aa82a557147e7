"""Writing a safetensors file from staged buffers, and reading byte ranges back, with checksums.

torch is imported only where torch tensors are made: the byte-level work (write a header and raw data, read a
shard's bytes and check its CRCs) also serves numpy arrays, so a merge runs without importing torch.

Written by hand (the format is an 8-byte little-endian header length, a JSON header, then the raw data) so
that the staged buffers go to disk without another copy and every tensor's absolute byte range is known
for the metadata. The result is an ordinary safetensors file. ``SafetensorsWriter`` writes one tensor at a
time (the header is computed from declared shapes up front), so a merge or an export of a model of any size
holds one tensor in memory, not the model.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from megascope.engine.checkpoint.format import BLOCK_BYTES, DTYPE_BYTES, CheckpointError, Shard, block_crcs

if TYPE_CHECKING:
    import torch

    Data = torch.Tensor | np.ndarray

_ALIGN = 8


@dataclass
class Written:
    byte_start: int
    byte_end: int
    crc32: list[int]


@dataclass
class WrittenFile:
    tensors: dict[str, Written]
    header_crc32: int
    """CRC-32 of the file's header bytes (the 8-byte length and the JSON), for the metadata's ``headers``."""


def _bytes_of(data: Data) -> memoryview:
    """The raw bytes of a CPU tensor or a numpy array, without a copy (a contiguous copy if it is not)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8).data
    flat = data.contiguous().view(-1)
    if not flat.numel():
        return memoryview(b"")
    import torch

    return memoryview(flat.view(torch.uint8).numpy().data)


def _dtype_name(data: Data) -> str | None:
    if isinstance(data, np.ndarray):
        return _NUMPY_NAMES.get(data.dtype.str.lstrip("<|="))
    from megascope.engine.checkpoint.format import DTYPES

    return DTYPES.get(data.dtype)


_NUMPY_NAMES = {"f4": "F32", "f2": "F16", "f8": "F64", "i8": "I64", "i4": "I32", "i2": "I16", "i1": "I8", "u1": "U8",
                "b1": "BOOL"}  # fmt: skip
"""numpy's dtype codes for our dtype names; bf16 travels as its raw 16 bits (``u2``, see ``write``)."""


class SafetensorsWriter:
    """Writes one safetensors file tensor by tensor, never holding more than the tensor being written.

    safetensors puts the header (every tensor's dtype, shape and byte range) before the data, so the caller
    declares every tensor up front (``specs``: key -> (dtype name, shape), in file order); then ``write``
    appends each tensor's data in that same order. ``close`` checks nothing is missing and fsyncs.
    """

    def __init__(
        self, path: Path, specs: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None
    ) -> None:
        header: dict[str, object] = {}
        self._ranges: dict[str, tuple[int, int]] = {}
        position = 0
        for key, (dtype, shape) in specs.items():
            size = int(np.prod(shape, dtype=np.int64)) * DTYPE_BYTES[dtype]
            header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [position, position + size]}
            self._ranges[key] = (position, position + size)
            position += size
        if metadata:
            header["__metadata__"] = metadata
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % _ALIGN)  # data starts 8-byte aligned, as safetensors recommends
        self._data_start = 8 + len(encoded)
        self._specs = specs
        self._order = iter(specs)
        self.size = self._data_start + position
        """The file's final size in bytes."""
        self.path = path
        prefix = struct.pack("<Q", len(encoded))
        self.header_crc32 = zlib.crc32(encoded, zlib.crc32(prefix))
        """CRC-32 of the header bytes as written (the metadata's ``headers``: every byte checksummed)."""
        self._file = open(path, "wb")  # noqa: SIM115  # closed by close() or abort()
        self._file.write(prefix)
        self._file.write(encoded)
        self._written = 0

    def write(self, key: str, tensor: Data) -> Written:
        """Append ``tensor`` (a CPU tensor or a numpy array), which must be the next declared key, with that dtype
        and shape. A bf16 array comes as numpy uint16 (numpy has no bf16): its raw bits."""
        expected = next(self._order, None)
        dtype, shape = self._specs.get(key, ("?", []))
        got = _dtype_name(tensor)
        if isinstance(tensor, np.ndarray) and tensor.dtype == np.uint16 and dtype == "BF16":
            got = "BF16"  # numpy has no bf16: its raw bits travel as uint16
        if key != expected or got != dtype or list(tensor.shape) != list(shape):
            raise CheckpointError(
                f"{self.path}: wrote {key} {got} {list(tensor.shape)}, "
                f"the header declares {expected} next ({dtype} {list(shape)})"
            )
        data = _bytes_of(tensor)
        self._file.write(data)
        start, end = (self._data_start + offset for offset in self._ranges[key])
        self._written += 1
        return Written(start, end, block_crcs(data))

    def close(self) -> None:
        if self._written != len(self._specs):
            self.abort()
            raise CheckpointError(f"{self.path}: {self._written} of {len(self._specs)} declared tensors written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        """Close without finishing (the caller removes the file or its directory)."""
        self._file.close()


def write_file(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> WrittenFile:
    """Write ``tensors`` (CPU, contiguous) as one safetensors file, fsync it; their byte ranges and CRCs, and the
    header's CRC."""
    from megascope.engine.checkpoint.format import DTYPES

    writer = SafetensorsWriter(path, {key: (DTYPES[t.dtype], list(t.shape)) for key, t in tensors.items()}, metadata)
    try:
        written = {key: writer.write(key, tensor) for key, tensor in tensors.items()}
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return WrittenFile(written, writer.header_crc32)


def read_checked(
    step_dir: Path, name: str, shard: Shard, lo: int, hi: int, into: memoryview | None = None
) -> tuple[memoryview, int, int]:
    """Bytes ``lo .. hi`` (absolute positions in the shard's file), widened to whole checksum blocks, every block
    checked against its CRC. Returns (the bytes read, where they start in the file, how many were read).

    ``into``: a buffer of exactly ``hi - lo`` bytes to read into, used when ``lo .. hi`` is already whole blocks
    (any whole shard): the data lands in the caller's buffer with no copy.
    """
    # Widen to whole checksum blocks so every byte we use is verified.
    block_lo = (lo - shard.byte_start) // BLOCK_BYTES
    block_hi = -(-(hi - shard.byte_start) // BLOCK_BYTES) if hi > lo else block_lo
    read_lo = shard.byte_start + block_lo * BLOCK_BYTES
    read_hi = min(shard.byte_end, shard.byte_start + block_hi * BLOCK_BYTES)
    path = step_dir / shard.file
    if into is not None and ((read_lo, read_hi) != (lo, hi) or len(into) != hi - lo):
        into = None
    # One read into one buffer; the checksums (and the caller's view of the data) look into it.
    memory = into if into is not None else memoryview(bytearray(read_hi - read_lo))
    filled = 0
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(read_lo)
            while filled < len(memory):
                got = f.readinto(memory[filled:])
                if not got:
                    break
                filled += got
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing file (holds {name} rows {shard.offset}..)") from None
    if filled != len(memory):
        raise CheckpointError(f"{path}: truncated (the data of {name} ends at byte {read_hi}, file is shorter)")
    _check_blocks(memory, shard, block_lo, path, name)
    return memory, read_lo, filled


def map_checked(step_dir: Path, name: str, shard: Shard) -> memoryview:
    """A whole shard's bytes mapped read-only from its file (no copy out of the page cache), every block checked.

    The mapping lives as long as the returned view or anything made from it (numpy arrays); it is unmapped when
    the last of them goes. A file truncated in place while mapped would end the process with SIGBUS rather than
    give wrong data; committed checkpoints are never truncated (retention unlinks them, which keeps a mapping
    valid), and ``open_checkpoint`` checks every file's size first.
    """
    path = step_dir / shard.file
    start = shard.byte_start - shard.byte_start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < shard.byte_end:
                raise CheckpointError(f"{path}: truncated (the data of {name} ends at byte {shard.byte_end})")
            # MAP_POPULATE maps every page at once instead of one page fault at a time.
            flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
            mapped = mmap.mmap(f.fileno(), shard.byte_end - start, flags=flags, prot=mmap.PROT_READ, offset=start)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing file (holds {name} rows {shard.offset}..)") from None
    view = memoryview(mapped)[shard.byte_start - start :]
    _check_blocks(view, shard, 0, path, name)
    return view


def _check_blocks(data: memoryview, shard: Shard, first_block: int, path: Path, name: str) -> None:
    """Check ``data`` (the shard's bytes from block ``first_block`` on, whole blocks but the shard's last) against
    the shard's block CRCs."""
    for i, offset in enumerate(range(0, len(data), BLOCK_BYTES)):
        block = first_block + i
        if block >= len(shard.crc32) or zlib.crc32(data[offset : offset + BLOCK_BYTES]) != shard.crc32[block]:
            raise CheckpointError(f"{path}: checksum mismatch in {name} (block {block}); the file is damaged")


def read_rows(
    step_dir: Path,
    name: str,
    shard: Shard,
    dtype: str,
    row_shape: list[int],
    first: int,
    count: int,
    counter: list[int] | None = None,
    into: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rows ``first .. first+count`` (global row numbers) of one shard, reading only the blocks that hold them.

    Every block read is checked against its CRC; ``counter[0]`` accumulates the bytes read from disk. ``into``
    (the destination of these rows): when it is a contiguous CPU tensor of the stored dtype and the rows span
    whole checksum blocks (any whole shard), the data is read straight into it and ``into`` is returned, saving
    the copy.
    """
    import torch

    from megascope.engine.checkpoint.format import TORCH_DTYPES

    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * DTYPE_BYTES[dtype]
    lo = shard.byte_start + (first - shard.offset) * row_bytes
    hi = lo + count * row_bytes
    direct = (
        into is not None
        and into.device.type == "cpu"
        and into.dtype == TORCH_DTYPES[dtype]
        and into.is_contiguous()
        and not into.requires_grad
        and into.numel() * into.element_size() == hi - lo
        and hi > lo
    )
    target = _bytes_of(into) if direct and into is not None else None
    memory, read_lo, filled = read_checked(step_dir, name, shard, lo, hi, target)
    if counter is not None:
        counter[0] += filled
    if hi == lo:
        return torch.empty([count, *row_shape], dtype=TORCH_DTYPES[dtype])
    if target is not None and memory is target and into is not None:
        return into
    data = torch.frombuffer(memory[lo - read_lo : hi - read_lo], dtype=torch.uint8)
    return data.view(TORCH_DTYPES[dtype]).reshape([count, *row_shape])
