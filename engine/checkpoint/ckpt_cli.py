"""``megascope ckpt ls|inspect|verify``: look at checkpoints without a training job."""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from megascope.engine.checkpoint.format import Metadata

HELP = "list, describe, check and export checkpoints (ls DIR, inspect|verify DIR[/STEP], export DIR[/STEP] --hf OUT)"

_PATH_HELP = (
    "DIR/STEP: a step directory (ckpt/step_00000200), or DIR/N for step N (ckpt/200), or a checkpoint directory "
    "(its latest)"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="ckpt_command", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="every checkpoint in DIR: step, time, size, world size, complete or not")
    ls.add_argument("dir", type=Path)
    inspect = sub.add_parser("inspect", help="one checkpoint: what it holds (step, model, run, merge) and its tensors")
    inspect.add_argument("path", type=Path, metavar="DIR/STEP", help=_PATH_HELP)
    inspect.add_argument("--json", action="store_true", help="one JSON object instead of text (for scripts)")
    verify = sub.add_parser("verify", help="read every byte and check it; non-zero exit on any damage")
    verify.add_argument("path", type=Path, metavar="DIR/STEP", help=_PATH_HELP)
    export = sub.add_parser("export", help="write one checkpoint's model as a Hugging Face Llama model directory")
    export.add_argument("path", type=Path, metavar="DIR/STEP", help=_PATH_HELP)
    export.add_argument("--hf", type=Path, required=True, metavar="OUT",
                        help="new directory: config.json, model.safetensors and a byte-level tokenizer "
                        "(must not exist)")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    from megascope.engine.checkpoint.format import CheckpointError

    try:
        if hasattr(args, "path"):
            args.path = checkpoint_path(args.path)
        return {"ls": _ls, "inspect": _inspect, "verify": _verify, "export": _export}[args.ckpt_command](args)
    except BrokenPipeError:
        raise  # the reader went away (`| head`): the dispatcher ends quietly
    except CheckpointError as error:
        print(f"megascope ckpt {args.ckpt_command}: error: {error}", file=sys.stderr)
        return 1
    except OSError as error:  # permission denied, I/O error, ...: one line naming the file, no traceback
        print(f"megascope ckpt {args.ckpt_command}: error: {_os_error(error)}", file=sys.stderr)
        return 1


def checkpoint_path(path: Path) -> Path:
    """The checkpoint ``path`` names, as the help says: a step directory, a checkpoint directory (then its
    ``latest``), or ``DIR/N`` for step N of DIR. When it names none, the error lists the steps that exist, so the
    next command can be right (a step removed by retention is the usual case)."""
    from megascope.engine.checkpoint.format import LATEST, METADATA, CheckpointError, step_dir_name

    if path.name.endswith(".tmp") or (path / METADATA).is_file() or (path / LATEST).is_file():
        return path  # resolve() takes it from here, and says what is wrong with it
    if path.name.isdigit() and (path.parent / step_dir_name(int(path.name))).is_dir():
        return path.parent / step_dir_name(int(path.name))
    root = path if path.is_dir() else path.parent
    if not root.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint, and {root} is not a directory")
    raise CheckpointError(f"{path}: no checkpoint here; {_steps_in(root)}")


def _steps_in(root: Path) -> str:
    from megascope.engine.checkpoint.format import committed_steps

    steps = committed_steps(root)
    if not steps:
        return f"{root} holds no committed checkpoint"
    shown = ", ".join(map(str, steps[-20:]))
    more = f"{len(steps) - 20} older and " if len(steps) > 20 else ""
    return f"{root} holds {more}step{'s' if len(steps) > 1 else ''} {shown} (megascope ckpt ls {root})"


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
    if args.json:
        import json

        print(json.dumps(_description(step_dir, meta)))
        return 0
    for label, value in _summary_lines(step_dir, meta):
        print(f"{label:<11}{value}")
    print(f"\n{'tensor':<60}{'shape':<22}{'dtype':<7}{'shards':>7}  files")
    for name, tensor in meta.tensors.items():
        files = ",".join(sorted({s.file.removesuffix(".safetensors") for s in tensor.shards}))
        print(f"{name:<60}{str(tuple(tensor.shape)):<22}{tensor.dtype:<7}{len(tensor.shards):>7}  {files}")
    return 0


def _summary_lines(step_dir: Path, meta: Metadata) -> list[tuple[str, str]]:
    """What a person asks of a checkpoint first, one labelled line each: which step, saved when and how, of what
    model and run, and (for a merge) of which inputs."""
    extra = meta.extra
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(meta.created)) if meta.created else "unknown time"
    lines = [
        ("checkpoint", str(step_dir)),
        ("step", str(meta.step)),
        ("saved", f"{when} by {meta.world_size} rank(s) ({meta.layout}), {len(meta.files)} file(s), "
                  f"{_size(meta.total_bytes)}"),
    ]  # fmt: skip
    config = _mapping(extra.get("config"))
    model = _mapping(config.get("model"))
    n_model = sum(math.prod(t.shape) for name, t in meta.tensors.items() if name.startswith("model/"))
    if model:
        shape = (
            f"dim {model.get('dim')}, {model.get('n_layers')} layers, {model.get('n_heads')} heads "
            f"({model.get('n_kv_heads')} kv), ffn {model.get('ffn_dim')}, vocab {model.get('vocab_size')}"
        )
        kind = f"{model.get('norm')}, {model.get('activation')}"
        lines.append(("model", f"{config.get('preset', '?')}: {n_model / 1e6:.2f}M parameters, {shape}, {kind}"))
    optim = _mapping(config.get("optim"))
    if optim and "steps" in config:
        data = _mapping(config.get("data"))
        lines.append(("run", f"step {meta.step} of {config['steps']}, lr {optim.get('lr')} "
                             f"(warmup {optim.get('warmup_steps')}, decay {optim.get('decay_steps')}), "
                             f"{data.get('batch_tokens')} tokens/rank/step, seed {data.get('seed')}"))  # fmt: skip
    n_optim = sum(1 for name in meta.tensors if name.startswith("optim/"))
    kept = extra.get("optimizer")
    lines.append(("optimizer", f"{n_optim} state tensors" if n_optim else f"none ({kept or 'not saved'})"))
    merge = extra.get("merge")
    if isinstance(merge, dict):
        weights = ", ".join(f"{w:.3f}" for w in merge.get("weights") or [])
        alpha = f", alpha {merge['alpha']}" if merge.get("alpha") is not None else ""
        steps = ", ".join(map(str, merge.get("steps") or []))
        lines.append(("merge", f"{str(merge.get('method')).upper()} of steps {steps} (weights {weights}{alpha})"))
    data_state = extra.get("data")
    if isinstance(data_state, dict) and "consumed" in data_state:
        lines.append(("data", f"{data_state['consumed']} micro-batches consumed (a resume goes on from there)"))
    groups = Counter(name.split("/", 1)[0] for name in meta.tensors)
    lines.append(("tensors", f"{len(meta.tensors)}: " + ", ".join(f"{n} {group}" for group, n in groups.items())))
    return lines


def _mapping(value: object) -> dict[str, Any]:
    """``value`` if it is a JSON object, else empty: metadata written by older versions may lack a section."""
    return value if isinstance(value, dict) else {}


def _description(step_dir: Path, meta: Metadata) -> dict[str, object]:
    """``inspect --json``: the metadata's facts, without the byte ranges and checksums of every shard."""
    return {
        "path": str(step_dir),
        "step": meta.step,
        "created": meta.created,
        "world_size": meta.world_size,
        "layout": meta.layout,
        "bytes": meta.total_bytes,
        "files": sorted(meta.files),
        "extra": meta.extra,
        "tensors": {
            name: {"shape": list(t.shape), "dtype": t.dtype, "shards": len(t.shards)}
            for name, t in meta.tensors.items()
        },
    }


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
