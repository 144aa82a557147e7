"""Writing a safetensors file from staged buffers, and reading byte ranges back, with checksums.

Written by hand (the format is an 8-byte little-endian header length, a JSON header, then the raw data) so
that the staged buffers go to disk without another copy and every tensor's absolute byte range is known
for the metadata. The result is an ordinary safetensors file.
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


def write_file(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> dict[str, Written]:
    """Write ``tensors`` (CPU, contiguous) as one safetensors file, fsync it; their byte ranges and CRCs."""
    header: dict[str, object] = {}
    position = 0
    for key, tensor in tensors.items():
        size = tensor.numel() * tensor.element_size()
        header[key] = {
            "dtype": DTYPES[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [position, position + size],
        }
        position += size
    if metadata:
        header["__metadata__"] = metadata
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % _ALIGN)  # data starts 8-byte aligned, as safetensors recommends
    data_start = 8 + len(encoded)
    written: dict[str, Written] = {}
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key, tensor in tensors.items():
            data = _bytes_of(tensor)
            f.write(data)
            start = data_start + header[key]["data_offsets"][0]  # type: ignore[index]
            written[key] = Written(start, start + len(data), block_crcs(data))
        f.flush()
        os.fsync(f.fileno())
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
) -> torch.Tensor:
    """Rows ``first .. first+count`` (global row numbers) of one shard, reading only the blocks that hold them.

    Every block read is checked against its CRC; ``counter[0]`` accumulates the bytes read from disk.
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
    # One read into one buffer; the checksums and the returned tensor are views of it (no copies: the
    # caller's copy into its target is the only one).
    buffer = bytearray(read_hi - read_lo)
    memory = memoryview(buffer)
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
    data = torch.frombuffer(memory[lo - read_lo : hi - read_lo], dtype=torch.uint8)
    return data.view(TORCH_DTYPES[dtype]).reshape([count, *row_shape])
