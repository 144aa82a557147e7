"""Checkpoint merging in pre-training (PMA): a weighted average of committed checkpoints, streamed.

Inputs are checkpoints M_1 .. M_N of one run, oldest first (M_N is the newest); the result is
``sum_i w_i * M_i`` for every model tensor, with weights that sum to 1:

- ``sma``: w_i = 1 / N;
- ``wma``: w_i = i / (1 + 2 + ... + N), newer checkpoints weigh more;
- ``ema``: the recursion A_1 = M_1, A_i = alpha * M_i + (1 - alpha) * A_{i-1}, result A_N. Unrolled, that is
  w_1 = (1 - alpha)^(N-1) and w_i = alpha * (1 - alpha)^(N-i) for i >= 2, which sums to 1 exactly (the oldest
  checkpoint keeps the weight the recursion starts it with); the weights are computed by running the
  recursion on the weights themselves, so they are the recursion's, not a truncated closed form;
- ``weights``: the user's own weights, finite and summing to 1 within 1e-6.

Streaming, in bounded memory: one tensor at a time, a reader thread takes it from every input in turn (all
its shards, whatever world size saved the input, mapped from the files two inputs ahead on a small thread
pool, every block checked against its CRC), accumulates it in fp32 (numpy, in input order, four inputs at a
time into each cache-sized chunk of the sum), casts it to the stored dtype and hands it over a one-slot queue
to the calling thread, which appends it to the output file while the next tensor is read. The output's
safetensors header is computed up front from the inputs' metadata (every output tensor's shape and dtype is
known), so the data can follow in order. Memory is about the largest tensor times a small constant (about
ten, most of it mapped file pages: six inputs' copies, the sum, the cast result and the one handed over),
whatever the model's size. torch is not imported (only ``export_hf`` needs it), which keeps a `megascope
merge` process's start-up short.

The output ``OUT`` is a checkpoint root, like a run's ``--ckpt-dir``::

    OUT/
      latest                  -> step_<newest input step>
      step_XXXXXXXX/          a normal committed checkpoint: metadata.json + rank0.safetensors
      hf/                     with export_hf: config.json + model.safetensors (Hugging Face Llama)

so ``megascope train --init-from OUT`` and ``megascope ckpt ls|inspect|verify OUT`` work on it, and it loads
into any world size. It is built in ``OUT.tmp`` and renamed to ``OUT`` only when complete (fsynced): a merge
that fails or is stopped publishes nothing. ``OUT.tmp`` doubles as a lock: a second merge into the same
``OUT`` while one runs is refused.

Model tensors (``model/*``) are merged. Optimizer state is never averaged (Adam moments of different points
do not average into the moments of the average): by default the output has none, so training from it starts
a fresh optimizer; with ``keep_optimizer`` the newest input's optimizer tensors are copied unchanged. The
metadata says which (``extra.optimizer_averaged`` is always false).
"""

from __future__ import annotations

import math
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megascope.engine.checkpoint.format import (
    DTYPE_BYTES,
    LATEST,
    METADATA,
    CheckpointError,
    Metadata,
    Shard,
    TensorMeta,
    committed_steps,
    open_checkpoint,
    step_dir_name,
    write_atomically,
)
from megascope.engine.checkpoint.safetensors_io import SafetensorsWriter, map_checked
from megascope.engine.checkpoint.streaming import Stopped, publish, stream, tmp_path

METHODS = ("sma", "wma", "ema", "weights")
DEFAULT_ALPHA = 0.2
"""EMA's alpha when none is given (the PMA paper used 0.1 and 0.2)."""
WEIGHT_SUM_TOLERANCE = 1e-6
OUTPUT_FILE = "rank0.safetensors"
HF_SUBDIR = "hf"
"""With ``export_hf``, the Hugging Face export inside the output directory."""
READ_AHEAD = 2
"""Inputs read at once for one tensor (each into its own buffer): keeps two cores busy reading and checking."""


class MergeError(CheckpointError):
    """A merge that cannot be done as asked; the message names the flag, step or tensor and what to change."""


# --- the weights --------------------------------------------------------------------------------------------


def merge_weights(method: str, n: int, alpha: float | None = None, weights: list[float] | None = None) -> list[float]:
    """The weight of each of ``n`` checkpoints, oldest first, for ``method``; raises MergeError on bad input."""
    if method not in METHODS:
        raise MergeError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if n < 2:
        raise MergeError(f"a merge needs at least two checkpoints, got {n}")
    if alpha is not None and method != "ema":
        raise MergeError(f"--alpha applies to --method ema only (the method is {method})")
    if weights is not None and method != "weights":
        raise MergeError(f"--weights sets the weights itself: use it without --method {method} (or --method weights)")
    if method == "sma":
        return [1.0 / n] * n
    if method == "wma":
        total = n * (n + 1) / 2
        return [i / total for i in range(1, n + 1)]
    if method == "ema":
        a = DEFAULT_ALPHA if alpha is None else alpha
        if not (math.isfinite(a) and 0.0 < a <= 1.0):
            raise MergeError(f"--alpha must be in (0, 1], got {a}")
        # The recursion A_1 = M_1, A_i = a*M_i + (1-a)*A_{i-1}, run on the weights: A_i = sum_j w_j M_j.
        result = [1.0]
        for _ in range(1, n):
            result = [(1.0 - a) * w for w in result] + [a]
        return result
    if weights is None:
        raise MergeError("--method weights needs --weights W1 .. WN (one per checkpoint, oldest first)")
    if len(weights) != n:
        raise MergeError(f"--weights gives {len(weights)} weights for {n} checkpoints (one each, oldest first)")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"--weights must all be finite numbers, got {weights}")
    total = math.fsum(weights)
    if abs(total - 1.0) > WEIGHT_SUM_TOLERANCE:
        raise MergeError(f"--weights must sum to 1 (within {WEIGHT_SUM_TOLERANCE:g}); they sum to {total!r}")
    return [float(w) for w in weights]


# --- which checkpoints ----------------------------------------------------------------------------------------


def select_steps(
    ckpt_dir: Path, steps: list[int] | None = None, last: int | None = None, every: int | None = None
) -> list[int]:
    """The steps to merge, oldest first: ``steps`` as given, or the newest ``last`` committed ones.

    With ``every``, the newest ``last`` steps spaced ``every`` apart, counted back from the newest committed
    step (S, S - V, ..., S - (N-1)V); each must be committed. Raises MergeError naming what is missing.
    """
    if not ckpt_dir.is_dir():
        raise MergeError(f"--ckpt-dir {ckpt_dir}: no such directory")
    committed = committed_steps(ckpt_dir)
    have = f"committed steps there: {_list(committed)}" if committed else "it has no committed checkpoint"
    if (steps is None) == (last is None):
        raise MergeError("give either --steps S1 S2 .. or --last N (optionally with --every V)")
    if every is not None and last is None:
        raise MergeError("--every V goes with --last N")
    if steps is not None:
        if len(set(steps)) != len(steps):
            raise MergeError(f"--steps lists a step twice: {steps}")
        chosen = sorted(steps)
    else:
        assert last is not None
        if last < 2:
            raise MergeError(f"--last must be at least 2 (a merge needs two checkpoints), got {last}")
        if every is None:
            if len(committed) < last:
                raise MergeError(f"--last {last}: {ckpt_dir} has {len(committed)} committed checkpoint(s); {have}")
            chosen = committed[-last:]
        else:
            if every < 1:
                raise MergeError(f"--every must be at least 1, got {every}")
            if not committed:
                raise MergeError(f"--last {last} --every {every}: {ckpt_dir} has no committed checkpoint")
            newest = committed[-1]
            chosen = [newest - k * every for k in reversed(range(last))]
            if chosen[0] < 0:
                raise MergeError(f"--last {last} --every {every} reaches back before step 0 from step {newest}")
    if len(chosen) < 2:
        raise MergeError(f"a merge needs at least two checkpoints, got {len(chosen)} ({_list(chosen)})")
    missing = [s for s in chosen if s not in committed]
    if missing:
        unfinished = [s for s in missing if (ckpt_dir / (step_dir_name(s) + ".tmp")).exists()]
        detail = f" (step {_list(unfinished)}: an unfinished save, never committed)" if unfinished else ""
        raise MergeError(f"{ckpt_dir}: no committed checkpoint for step {_list(missing)}{detail}; {have}")
    return chosen


def _list(steps: list[int]) -> str:
    return ", ".join(str(s) for s in steps)


# --- inputs and the output plan -------------------------------------------------------------------------------


@dataclass
class Input:
    step: int
    step_dir: Path
    metadata: Metadata


@dataclass(frozen=True)
class OutputTensor:
    name: str
    shape: list[int]
    dtype: str
    how: str
    """"merge" (weighted average), "same" (non-float: equal in every input, copied) or "copy" (newest input's)."""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES[self.dtype]


def open_inputs(ckpt_dir: Path, steps: list[int]) -> list[Input]:
    """Each step's committed checkpoint, its files present at full size (CheckpointError names any that is not)."""
    inputs = []
    for step in steps:
        step_dir, metadata = open_checkpoint(ckpt_dir / step_dir_name(step))
        inputs.append(Input(step, step_dir, metadata))
    return inputs


def plan_output(inputs: list[Input], keep_optimizer: bool = False) -> list[OutputTensor]:
    """What the output holds, in file order; raises MergeError when the inputs are not one model."""
    newest = inputs[-1]
    model_names = sorted(n for n in newest.metadata.tensors if n.startswith("model/"))
    if not model_names:
        raise MergeError(f"step {newest.step} ({newest.step_dir}) holds no model tensors (model/*): nothing to merge")
    for other in inputs[:-1]:
        names = sorted(n for n in other.metadata.tensors if n.startswith("model/"))
        if names != model_names:
            only_new = sorted(set(model_names) - set(names))[:3]
            only_old = sorted(set(names) - set(model_names))[:3]
            raise MergeError(
                f"steps {other.step} and {newest.step} hold different model tensors (only in {newest.step}: "
                f"{only_new or '-'}; only in {other.step}: {only_old or '-'}): merge checkpoints of one model"
            )
        for name in model_names:
            a, b = other.metadata.tensors[name], newest.metadata.tensors[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise MergeError(
                    f"{name}: step {other.step} has {a.dtype} {a.shape}, step {newest.step} has {b.dtype} {b.shape}: "
                    "merge checkpoints of one model"
                )
    plan = []
    for name in model_names:
        meta = newest.metadata.tensors[name]
        plan.append(OutputTensor(name, list(meta.shape), meta.dtype, "merge" if meta.dtype in _FLOATS else "same"))
    if keep_optimizer:
        optim = sorted(n for n in newest.metadata.tensors if n.startswith("optim/"))
        if not optim:
            raise MergeError(
                f"--keep-optimizer: step {newest.step} has no optimizer state to keep; merge without it "
                "(training from the merge then starts a fresh optimizer)"
            )
        plan += [
            OutputTensor(n, list(newest.metadata.tensors[n].shape), newest.metadata.tensors[n].dtype, "copy")
            for n in optim
        ]
    return plan


# --- the streaming pipeline -----------------------------------------------------------------------------------

Progress = Callable[[int, int, int, int], None]
"""(tensors_done, tensors_total, bytes_done, bytes_total); bytes are input bytes read and merged."""


_FLOATS = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}
"""How each float dtype is held in numpy: bf16 (which numpy lacks) as its raw 16 bits."""
_STORED = {**_FLOATS, "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
           "BOOL": np.bool_}  # fmt: skip
_CHUNK = 1 << 16
"""Elements of the total accumulated at a time: the chunk (256 KiB in fp32) stays in the CPU cache."""
_GROUP = 4
"""Inputs added to each chunk of the total while it is in the cache (see ``_accumulate``)."""


def read_array(source: Input, name: str) -> np.ndarray:
    """Input ``source``'s whole tensor ``name`` as one array of the stored dtype (as in ``_STORED``), every
    block checked: its shards' mapped segments copied into place."""
    meta = source.metadata.tensors[name]
    out = np.empty(meta.shape, dtype=_STORED[meta.dtype])
    flat = out.reshape(-1)
    for at, values in map_segments(source, name):
        flat[at : at + values.size] = values
    return out


def map_segments(source: Input, name: str) -> list[tuple[int, np.ndarray]]:
    """Input ``source``'s tensor ``name`` as (first element, values) per shard, mapped from the files (no copy),
    every block checked; bf16 values as their raw 16 bits."""
    meta = source.metadata.tensors[name]
    row_bytes = meta.row_bytes()
    row_elements = row_bytes // DTYPE_BYTES[meta.dtype]
    segments: list[tuple[int, np.ndarray]] = []
    rows = 0
    for shard in meta.shards:
        if shard.byte_end - shard.byte_start != shard.rows * row_bytes:
            raise CheckpointError(f"{source.step_dir}: {name}: a shard's byte range does not match its rows")
        if shard.rows:
            view = map_checked(source.step_dir, name, shard)
            segments.append((shard.offset * row_elements, np.frombuffer(view, dtype=_STORED[meta.dtype])))
        rows += shard.rows
    if rows != (meta.shape[0] if meta.shape else 1):
        raise CheckpointError(
            f"{source.step_dir}: {name}: its shards cover {rows} rows of {meta.shape} (one is missing)"
        )
    return segments


def _as_float(raw: np.ndarray, dtype: str, scratch: np.ndarray) -> np.ndarray:
    """``raw`` (stored dtype) as the accumulator's float type, in ``scratch`` unless it already is one."""
    if dtype == "BF16":  # a bf16 is the high half of the fp32 with the same value
        bits = scratch.view(np.uint32)
        np.copyto(bits, raw)
        np.left_shift(bits, 16, out=bits)
        return scratch
    if raw.dtype != scratch.dtype:
        np.copyto(scratch, raw)
        return scratch
    return raw


def _to_stored(total: np.ndarray, dtype: str) -> np.ndarray:
    """The fp32 (or fp64) sum in the stored dtype, rounded to nearest even as torch rounds."""
    if dtype != "BF16":
        return total if total.dtype == _FLOATS[dtype] else total.astype(_FLOATS[dtype])
    bits = total.view(np.uint32)
    rounded = np.right_shift(bits, 16)
    np.bitwise_and(rounded, 1, out=rounded)
    np.add(rounded, 0x7FFF, out=rounded)
    np.add(rounded, bits, out=rounded)
    np.right_shift(rounded, 16, out=rounded)
    out = rounded.astype(np.uint16)
    nan = np.isnan(total)
    if nan.any():
        out[nan] = 0x7FC0  # torch's bf16 NaN
    return out


def _accumulate(
    flat_total: np.ndarray,
    group: list[tuple[float, list[tuple[int, np.ndarray]]]],
    dtype: str,
    scratch: np.ndarray,
    scale: bool,
) -> None:
    """Add each input of ``group`` (weight, shard segments), in order, times its weight if ``scale``, to
    ``flat_total``.

    Chunk by chunk of the total, every input of the group in turn: the chunk stays in the CPU cache while the
    group's inputs are added to it, so the total is read and written once per group rather than once per input
    (the accumulation is memory-bound, and the merge's critical path). Every element still receives the inputs
    in input order, so the result does not depend on the grouping.
    """
    if not group:
        return
    for lo in range(0, flat_total.size, _CHUNK):
        hi = min(lo + _CHUNK, flat_total.size)
        out = flat_total[lo:hi]
        for weight, segments in group:
            for at, raw in segments:
                a, b = max(lo, at), min(hi, at + raw.size)
                if a >= b:
                    continue
                value = _as_float(raw[a - at : b - at], dtype, scratch[: b - a])
                target = out[a - lo : b - lo]
                if scale:
                    np.multiply(value, weight, out=scratch[: b - a])
                    value = scratch[: b - a]
                np.add(target, value, out=target)


class _Reader:
    """Produces each output tensor from the inputs: the weighted sum accumulated in fp32, cast back.

    Inputs are read ``READ_AHEAD`` at a time on a small thread pool (file reads, CRC checks and numpy's loops
    all release the GIL) while the reader thread accumulates them, always in input order, so the result does
    not depend on timing. numpy, not torch: a merge needs no autograd or devices, and not importing torch
    saves the `megascope merge` process a second and a half of its start.
    """

    def __init__(self, inputs: list[Input], weights: list[float], plan: list[OutputTensor], stop: threading.Event):
        self.inputs = inputs
        self.weights = weights
        self.plan = {t.name: t for t in plan}
        self.stop = stop
        self._pool = ThreadPoolExecutor(max_workers=READ_AHEAD, thread_name_prefix="megascope-merge-read")

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read_all(self, tensor: OutputTensor) -> Iterator[tuple[Input, list[tuple[int, np.ndarray]]]]:
        """Every input's tensor as shard segments, in input order; the next ones are mapped and checked meanwhile."""
        pending: deque[Future[list[tuple[int, np.ndarray]]]] = deque()

        def submit(i: int) -> None:
            pending.append(self._pool.submit(map_segments, self.inputs[i], tensor.name))

        for i in range(min(READ_AHEAD, len(self.inputs))):
            submit(i)
        for i, source in enumerate(self.inputs):
            if self.stop.is_set():
                raise Stopped()
            yield source, pending.popleft().result()
            # The caller is done with input i's buffer: read input i + READ_AHEAD into it.
            if i + READ_AHEAD < len(self.inputs):
                submit(i + READ_AHEAD)

    def __call__(self, name: str) -> np.ndarray:
        tensor = self.plan[name]
        newest = self.inputs[-1]
        if tensor.how == "copy":
            return read_array(newest, name)
        if tensor.how == "same":
            first = read_array(newest, name)
            flat_first = first.reshape(-1)
            for source, segments in self._read_all(tensor):
                if not all(np.array_equal(v, flat_first[at : at + v.size]) for at, v in segments):
                    raise MergeError(
                        f"{name}: a {tensor.dtype} tensor (not averageable) that differs between steps "
                        f"{source.step} and {newest.step}: merge checkpoints of one model"
                    )
            return first
        # fp32 accumulation whatever the stored dtype (fp64 ones keep their precision).
        kind = np.float64 if tensor.dtype == "F64" else np.float32
        total = np.zeros(tensor.shape, dtype=kind)
        flat_total = total.reshape(-1)
        scratch = np.empty(_CHUNK, dtype=kind)
        # Equal weights (SMA): sum the inputs and scale the sum once, which saves a multiply per element.
        equal = len(set(self.weights)) == 1
        group: list[tuple[float, list[tuple[int, np.ndarray]]]] = []
        for (_, segments), weight in zip(self._read_all(tensor), self.weights, strict=True):
            group.append((weight, segments))
            if len(group) == _GROUP:
                _accumulate(flat_total, group, tensor.dtype, scratch, scale=not equal)
                group.clear()  # the last references to these inputs' mappings: unmapped now
            del segments
        _accumulate(flat_total, group, tensor.dtype, scratch, scale=not equal)
        group.clear()
        if equal:
            np.multiply(total, self.weights[0], out=total)
        return _to_stored(total, tensor.dtype)


# --- the merge ------------------------------------------------------------------------------------------------


@dataclass
class MergeResult:
    out: Path
    step_dir: Path
    """The committed step directory inside ``out``."""
    steps: list[int]
    method: str
    alpha: float | None
    weights: list[float]
    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    hf_dir: Path | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def check_output(out: Path) -> Path:
    """The temporary directory for ``out``; MergeError when ``out`` exists or another merge is writing it."""
    if out.exists():
        raise MergeError(f"--out {out} already exists; a merge never overwrites: choose a new directory")
    tmp = tmp_path(out)
    if tmp.exists():
        raise MergeError(
            f"{tmp} exists: another merge into {out} is running, or one was killed; if none is running, remove it"
        )
    return tmp


def merge(
    ckpt_dir: Path,
    out: Path,
    method: str,
    *,
    steps: list[int] | None = None,
    last: int | None = None,
    every: int | None = None,
    alpha: float | None = None,
    weights: list[float] | None = None,
    keep_optimizer: bool = False,
    export_hf: bool = False,
    progress: Progress | None = None,
    stop: threading.Event | None = None,
    before_publish: Callable[[Path], None] | None = None,
) -> MergeResult:
    """Merge checkpoints of ``ckpt_dir`` into the new checkpoint root ``out``; see the module docstring.

    Everything that can be checked is checked before a byte is written (selection, weights, inputs, output).
    ``before_publish(step_dir)`` runs on the complete, unpublished result (evaluation). On any error or stop
    the temporary directory is removed and ``out`` is never created.
    """
    started = time.perf_counter()
    stop = stop or threading.Event()
    ckpt_dir, out = Path(ckpt_dir), Path(out)
    if method == "ema" and alpha is None:
        alpha = DEFAULT_ALPHA
    chosen = select_steps(ckpt_dir, steps, last, every)
    chosen_weights = merge_weights(method, len(chosen), alpha, weights)
    tmp = check_output(out)
    inputs = open_inputs(ckpt_dir, chosen)
    plan = plan_output(inputs, keep_optimizer)
    newest = inputs[-1]
    hf_plan = None
    if export_hf:
        from megascope.engine.checkpoint.hf_export import HFPlan  # imports the model, and torch: only when asked

        hf_plan = HFPlan.from_checkpoint(newest.metadata, newest.step_dir, [t.name for t in plan])
    out_bytes = sum(t.nbytes for t in plan) * (2 if hf_plan else 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(out.parent).free
    if free < out_bytes:
        raise MergeError(
            f"--out {out}: the merge writes {out_bytes / 1e6:.1f} MB, the disk has {free / 1e6:.1f} MB free"
        )
    try:
        tmp.mkdir()  # fails if another merge took the name since check_output: the lock
    except FileExistsError:
        raise MergeError(f"{tmp} exists: another merge into {out} is running") from None

    try:
        step_dir = tmp / step_dir_name(newest.step)
        step_dir.mkdir()
        reads = {t.name: t.nbytes * (1 if t.how == "copy" else len(inputs)) for t in plan}
        bytes_total, done = sum(reads.values()), [0, 0]
        writer = SafetensorsWriter(step_dir / OUTPUT_FILE, {t.name: (t.dtype, t.shape) for t in plan},
                                   {"format": "pt", "megascope": "merge"})  # fmt: skip
        hf_writer = hf_plan.writer(tmp / HF_SUBDIR) if hf_plan else None
        shards: dict[str, TensorMeta] = {}
        dtypes = {t.name: t.dtype for t in plan}

        def consume(name: str, tensor: np.ndarray) -> None:
            written = writer.write(name, tensor)
            rows = tensor.shape[0] if tensor.ndim else 1
            shard = Shard(OUTPUT_FILE, name, 0, rows, written.byte_start, written.byte_end, written.crc32)
            shards[name] = TensorMeta(list(tensor.shape), dtypes[name], [shard])
            if hf_writer is not None:
                hf_writer.write(name, tensor)

        def on_done(name: str) -> None:
            done[0] += 1
            done[1] += reads[name]
            if progress is not None:
                progress(done[0], len(plan), done[1], bytes_total)

        if progress is not None:
            progress(0, len(plan), 0, bytes_total)
        reader = _Reader(inputs, chosen_weights, plan, stop)
        try:
            stream([t.name for t in plan], reader, consume, stop, on_done)
        except BaseException:
            writer.abort()
            if hf_writer is not None:
                hf_writer.abort()
            raise
        finally:
            reader.close()
        writer.close()
        if hf_writer is not None:
            hf_writer.close()
        extra = merged_extra(inputs, method, alpha, chosen_weights, keep_optimizer)
        metadata = Metadata(
            step=newest.step,
            world_size=1,
            layout="single",
            tensors=shards,
            files={OUTPUT_FILE: writer.size},
            extra=extra,
            headers={OUTPUT_FILE: writer.header_crc32},
            created=time.time(),
        )
        write_atomically(step_dir / METADATA, metadata.to_json())
        write_atomically(tmp / LATEST, step_dir.name + "\n")
        if stop.is_set():
            raise Stopped()
        if before_publish is not None:
            before_publish(step_dir)
        if stop.is_set():
            raise Stopped()
        publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return MergeResult(
        out=out,
        step_dir=out / step_dir.name,
        steps=chosen,
        method=method,
        alpha=alpha if method == "ema" else None,
        weights=chosen_weights,
        tensors=len(plan),
        bytes_read=bytes_total,
        bytes_written=writer.size + (hf_writer.size if hf_writer is not None else 0),
        seconds=time.perf_counter() - started,
        hf_dir=out / HF_SUBDIR if hf_plan else None,
        extra=extra,
    )


def merged_extra(
    inputs: list[Input], method: str, alpha: float | None, weights: list[float], keep_optimizer: bool
) -> dict[str, Any]:
    """The output's ``extra``: the newest input's run record (config, data position, world size) plus the merge."""
    newest = inputs[-1]
    extra = {k: v for k, v in newest.metadata.extra.items() if k in ("config", "data", "world_size")}
    extra.update(
        step=newest.step,
        merge={
            "method": method,
            "alpha": alpha if method == "ema" else None,
            "weights": weights,
            "steps": [i.step for i in inputs],
            "sources": [str(i.step_dir.resolve()) for i in inputs],
        },
        optimizer_averaged=False,
        optimizer=f"copied from step {newest.step}" if keep_optimizer else "none",
    )
    return extra
