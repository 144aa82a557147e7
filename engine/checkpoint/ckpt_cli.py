"""``megascope ckpt ls|inspect|verify``: look at checkpoints without a training job."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

HELP = "list, describe, check and export checkpoints (ls DIR, inspect|verify DIR[/STEP], export DIR[/STEP] --hf OUT)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="every checkpoint in DIR: step, time, size, world size, complete or not")
    ls.add_argument("dir", type=Path)
    inspect = sub.add_parser("inspect", help="one checkpoint's tensors: shapes, dtypes, shards")
    inspect.add_argument("path", type=Path, help="a step directory, or a checkpoint root (its latest)")
    verify = sub.add_parser("verify", help="read every byte and check it; non-zero exit on any damage")
    verify.add_argument("path", type=Path, help="a step directory, or a checkpoint root (its latest)")
    export = sub.add_parser("export", help="write one checkpoint's model as a Hugging Face Llama model directory")
    export.add_argument("path", type=Path, help="a step directory, or a checkpoint root (its latest)")
    export.add_argument("--hf", type=Path, required=True, metavar="OUT",
                        help="new directory: config.json + model.safetensors (must not exist)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from megascope.engine.checkpoint.format import CheckpointError

    try:
        return {"ls": _ls, "inspect": _inspect, "verify": _verify, "export": _export}[args.ckpt_command](args)
    except CheckpointError as error:
        print(f"megascope ckpt {args.ckpt_command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # permission denied, I/O error, ...: one line naming the file, no traceback
        print(f"megascope ckpt {args.ckpt_command}: error: {_os_error(error)}", file=sys.stderr)
        return 1


def _os_error(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return f"{n:.1f} GB"


def _ls(args: argparse.Namespace) -> int:
    from megascope.engine.checkpoint.format import (
        CheckpointError,
        check_header,
        check_sizes,
        read_latest,
        read_metadata,
    )

    directory: Path = args.dir
    if not directory.is_dir():
        print(f"megascope ckpt ls: error: {directory}: no such directory", file=sys.stderr)
        return 1
    entries = sorted(directory.iterdir())  # unreadable: one line (run)
    try:
        latest = read_latest(directory)
    except (CheckpointError, OSError) as error:
        reason = _os_error(error) if isinstance(error, OSError) else str(error)
        print(f"megascope ckpt ls: warning: {reason}", file=sys.stderr)
        latest = None
    rows = []
    for entry in entries:
        if not entry.name.startswith("step_") or not entry.is_dir():
            continue
        step = entry.name.removeprefix("step_").split(".")[0].lstrip("0") or "0"
        size = 0
        try:
            size = sum(f.stat().st_size for f in entry.iterdir() if f.is_file())
            if entry.name.endswith(".tmp"):
                raise CheckpointError("unfinished")
            if "." in entry.name:
                raise CheckpointError(f"set aside ({entry.name.split('.', 1)[1]}), never loaded")
            meta = read_metadata(entry)
            check_sizes(entry, meta)  # a step with a missing or truncated file is not "complete"
            for file in meta.files:
                check_header(entry, meta, file)  # a few KB per file: ls stays cheap
            status = "complete, latest" if entry.name == latest else "complete"
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.created))
            rows.append((str(meta.step), when, _size(size), str(meta.world_size), meta.layout, status))
        except CheckpointError as error:
            state = "INCOMPLETE: unfinished save, never loaded" if entry.name.endswith(".tmp") else f"DAMAGED: {error}"
            rows.append((step, "-", _size(size), "-", "-", state))
        except OSError as error:
            rows.append((step, "-", _size(size) if size else "-", "-", "-", f"UNREADABLE: {_os_error(error)}"))
    if not rows:
        print(f"no checkpoints in {directory}")
        return 0
    header = ("step", "saved", "size", "world", "layout", "status")
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip())
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from megascope.engine.checkpoint.loader import open_checkpoint

    step_dir, meta = open_checkpoint(args.path)
    print(f"{step_dir}: step {meta.step}, saved by {meta.world_size} rank(s) ({meta.layout}), "
          f"{len(meta.files)} file(s), {_size(meta.total_bytes)}")  # fmt: skip
    for key in sorted(meta.extra):
        if key != "config":
            print(f"  {key}: {meta.extra[key]}")
    print(f"\n{'tensor':<60}{'shape':<22}{'dtype':<7}{'shards':>7}  files")
    for name, tensor in meta.tensors.items():
        files = ",".join(sorted({s.file.removesuffix(".safetensors") for s in tensor.shards}))
        print(f"{name:<60}{str(tuple(tensor.shape)):<22}{tensor.dtype:<7}{len(tensor.shards):>7}  {files}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megascope.engine.checkpoint.loader import verify

    start = time.perf_counter()
    meta = verify(args.path)
    print(f"OK: step {meta.step}: {len(meta.tensors)} tensors in {len(meta.files)} file(s), "
          f"{_size(meta.total_bytes)} checked in {time.perf_counter() - start:.2f}s")  # fmt: skip
    return 0


def _export(args: argparse.Namespace) -> int:
    from megascope.engine.checkpoint.hf_export import export

    start = time.perf_counter()
    out = export(args.path, args.hf)
    size = sum(f.stat().st_size for f in out.iterdir())
    seconds = time.perf_counter() - start
    print(f"exported {args.path} as a Hugging Face Llama model: {out} ({_size(size)}) in {seconds:.2f}s")
    return 0
