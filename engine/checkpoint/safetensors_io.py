"""Writing a safetensors file from staged buffers, and reading byte ranges back, with checksums.

Written by hand (the format is an 8-byte little-endian header length, a JSON header, then the raw data) so
that the staged buffers go to disk without another copy and every tensor's absolute byte range is known
for the metadata. The result is an ordinary safetensors file. ``SafetensorsWriter`` writes one tensor at a
time (the header is computed from declared shapes up front), so a merge or an export of a model of any size
holds one tensor in memory, not the model.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from megascope.engine.checkpoint.format import BLOCK_BYTES, DTYPES, TORCH_DTYPES, CheckpointError, Shard, block_crcs

_ALIGN = 8


@dataclass
class Written:
    byte_start: int
    byte_end: int
    crc32: list[int]


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.contiguous().view(-1)
    return memoryview(flat.view(torch.uint8).numpy().data) if flat.numel() else memoryview(b"")


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
            size = int(np.prod(shape, dtype=np.int64)) * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
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
        self._file = open(path, "wb")  # noqa: SIM115  # closed by close() or abort()
        self._file.write(struct.pack("<Q", len(encoded)))
        self._file.write(encoded)
        self._written = 0

    def write(self, key: str, tensor: torch.Tensor) -> Written:
        """Append ``tensor`` (CPU), which must be the next declared key, with that dtype and shape."""
        expected = next(self._order, None)
        dtype, shape = self._specs.get(key, ("?", []))
        if key != expected or DTYPES.get(tensor.dtype) != dtype or list(tensor.shape) != list(shape):
            raise CheckpointError(
                f"{self.path}: wrote {key} {DTYPES.get(tensor.dtype)} {list(tensor.shape)}, "
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


def write_file(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict[str, Written]:
    """Write ``tensors`` (CPU, contiguous) as one safetensors file, fsync it; their byte ranges and CRCs."""
    writer = SafetensorsWriter(path, {key: (DTYPES[t.dtype], list(t.shape)) for key, t in tensors.items()}, metadata)
    try:
        written = {key: writer.write(key, tensor) for key, tensor in tensors.items()}
    except BaseException:
        writer.abort()
        raise
    writer.close()
    return written


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
    the copy (a streaming merge reads every byte of every input this way).
    """
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * torch.empty((), dtype=TORCH_DTYPES[dtype]).element_size()
    lo = shard.byte_start + (first - shard.offset) * row_bytes
    hi = lo + count * row_bytes
    # Widen to whole checksum blocks so every byte we use is verified.
    block_lo = (lo - shard.byte_start) // BLOCK_BYTES
    block_hi = -(-(hi - shard.byte_start) // BLOCK_BYTES) if hi > lo else block_lo
    read_lo = shard.byte_start + block_lo * BLOCK_BYTES
    read_hi = min(shard.byte_end, shard.byte_start + block_hi * BLOCK_BYTES)
    path = step_dir / shard.file
    direct = (
        into is not None
        and (read_lo, read_hi) == (lo, hi)
        and into.device.type == "cpu"
        and into.dtype == TORCH_DTYPES[dtype]
        and into.is_contiguous()
        and not into.requires_grad
        and into.numel() * into.element_size() == hi - lo
        and hi > lo
    )
    # One read into one buffer; the checksums and the returned tensor are views of it (no copies: the
    # caller's copy into its target is the only one, and with ``direct`` there is none).
    memory = _bytes_of(into) if direct and into is not None else memoryview(bytearray(read_hi - read_lo))
    buffer = memory
    filled = 0
    try:
        with open(path, "rb", buffering=0) as f:
            f.seek(read_lo)
            while filled < len(buffer):
                got = f.readinto(memory[filled:])
                if not got:
                    break
                filled += got
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing file (holds {name} rows {shard.offset}..)") from None
    if filled != len(buffer):
        raise CheckpointError(f"{path}: truncated (the data of {name} ends at byte {read_hi}, file is shorter)")
    if counter is not None:
        counter[0] += filled
    for i, block in enumerate(range(block_lo, block_hi)):
        chunk = memory[i * BLOCK_BYTES : (i + 1) * BLOCK_BYTES]
        if block >= len(shard.crc32) or zlib.crc32(chunk) != shard.crc32[block]:
            raise CheckpointError(f"{path}: checksum mismatch in {name} (block {block}); the file is damaged")
    if hi == lo:
        return torch.empty([count, *row_shape], dtype=TORCH_DTYPES[dtype])
    if direct and into is not None:
        return into
    data = torch.frombuffer(memory[lo - read_lo : hi - read_lo], dtype=torch.uint8)
    return data.view(TORCH_DTYPES[dtype]).reshape([count, *row_shape])
