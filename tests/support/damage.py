"""Damage made on purpose to a saved checkpoint, shared by the data-safety tests and ``bench/probe`` (issue 17).

Each maker changes real files the engine's own checkpointer wrote: a flipped byte, a truncated file, a missing
metadata.json, a ``latest`` that leads nowhere or into another run, a file name escaping its checkpoint; and
:func:`denied` makes a permission error in process (root reads a chmod 000 directory anyway).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from megascope.engine.checkpoint import Checkpointer
from megascope.engine.checkpoint.format import LATEST, METADATA, step_dir_name


def flip(path: Path, position: int) -> None:
    """Flip the lowest bit of the byte at ``position``."""
    raw = bytearray(path.read_bytes())
    raw[position] ^= 0x01
    path.write_bytes(bytes(raw))


def header_length(path: Path) -> int:
    """The length of a safetensors file's JSON header (its first 8 bytes, little-endian)."""
    return int.from_bytes(path.read_bytes()[:8], "little")


def escape(step_dir: Path, outside: Path) -> str:
    """Point metadata.json's file at ``../../outside/r1.safetensors`` (a copy of the real one, so it would load)."""
    outside.mkdir(parents=True, exist_ok=True)
    shutil.copy(step_dir / "rank0.safetensors", outside / "r1.safetensors")
    name = os.path.relpath(outside / "r1.safetensors", step_dir)
    assert name.startswith("..")
    text = (step_dir / METADATA).read_text().replace('"rank0.safetensors"', json.dumps(name))
    (step_dir / METADATA).write_text(text)
    (step_dir / "rank0.safetensors").unlink()
    return name


def damage(root: Path, step: int, how: str, outside: Path) -> None:
    """Damage checkpoint ``step`` of ``root`` (or its ``latest``) as ``how`` says (truncated, a flipped data or header
    byte, no metadata.json, ``latest`` on a missing directory or into another run, a file name escaping it)."""
    step_dir = root / step_dir_name(step)
    data = step_dir / "rank0.safetensors"
    if how == "truncated":
        data.write_bytes(data.read_bytes()[:-100])
    elif how == "flipped data byte":
        flip(data, data.stat().st_size - 10)
    elif how == "flipped header byte":
        flip(data, 8 + header_length(data) // 2)
    elif how == "no metadata.json":
        (step_dir / METADATA).unlink()
    elif how == "latest on a missing directory":
        (root / LATEST).write_text("step_00000099\n")
    elif how == "latest absolute, into another run":
        other = outside / "other-run"
        Checkpointer(other).close()
        shutil.copytree(step_dir, other / step_dir.name)
        (root / LATEST).write_text(str(other / step_dir.name) + "\n")
    elif how == "file name escaping the checkpoint":
        escape(step_dir, outside)
    else:
        raise AssertionError(how)


@contextlib.contextmanager
def denied(below: Path) -> Iterator[None]:
    """Permission denied on anything under ``below`` (what chmod 000 does for a user who is not root), in process:
    ``Path.iterdir``, ``Path.read_text`` and ``Path.open`` raise EACCES there until the block ends."""
    real_iterdir, real_read_text, real_open = Path.iterdir, Path.read_text, Path.open

    def check(path: Path) -> None:
        if str(path).startswith(str(below)):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    def iterdir(self: Path) -> Any:
        check(self)
        return real_iterdir(self)

    def read_text(self: Path, *args: Any, **kwargs: Any) -> str:
        check(self)
        return real_read_text(self, *args, **kwargs)

    def open_(self: Path, *args: Any, **kwargs: Any) -> Any:
        check(self)
        return real_open(self, *args, **kwargs)

    with (
        mock.patch.object(Path, "iterdir", iterdir),
        mock.patch.object(Path, "read_text", read_text),
        mock.patch.object(Path, "open", open_),
    ):
        yield
