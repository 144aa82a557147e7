"""``megascope merge``: average checkpoints of a run (PMA: SMA, WMA, EMA or given weights), streamed.

    megascope merge --ckpt-dir DIR --method sma|wma|ema [--alpha A] (--steps S ... | --last N [--every V])
                    --out OUT [--eval] [--export-hf] [--keep-optimizer] [--progress bar|json|none]
    megascope merge --ckpt-dir DIR --weights W1 .. WN (--steps ... | --last N) --out OUT

OUT becomes a checkpoint root (``OUT/latest``, ``OUT/step_<newest step>/``, and ``OUT/hf/`` with
``--export-hf``); ``megascope train --init-from OUT`` trains from it. See megascope.engine.checkpoint.merge.

The machine contract (``--progress json``, read by the agent): stdout carries one JSON object per line,
``{"event": "progress", "tensors_done", "tensors_total", "bytes_done", "bytes_total"}`` (bytes: input bytes
read and merged; at most ~10 lines a second, and always one at 0 and one at the end), then one
``{"event": "done", "out", "steps", "method", "weights", "val_loss", "input_val_losses"}``. A failure exits 2
with ``megascope merge: error: ...`` on stderr; SIGTERM or SIGINT stops the merge, publishes nothing,
removes the temporary directory and exits 130. Nothing else is printed to stdout in that mode.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import signal
import sys
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

HELP = "merge checkpoints of a run (PMA: sma, wma, ema or given weights) into a new checkpoint, streamed"

_PROGRESS_INTERVAL = 0.1
"""At most ten progress lines a second (the agent relays them)."""


def _numbers(kind: type[int] | type[float]) -> Any:
    """argparse type: one number or a comma-separated list of them (``--steps 100,200 300`` works)."""

    def parse(text: str) -> list[int] | list[float]:
        try:
            return [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {kind.__name__} or a comma-separated list: {text!r}") from None

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ckpt-dir", type=Path, required=True, help="the run's checkpoint directory")
    parser.add_argument(
        "--out",
        type=Path,
        required=True,
        help="new directory for the result (a checkpoint root: latest + step_*/); must not exist",
    )
    how = parser.add_argument_group("weights (inputs are ordered oldest first; the newest is M_N)")
    how.add_argument(
        "--method",
        choices=["sma", "wma", "ema", "weights"],
        help="sma: 1/N each; wma: i/(1+..+N); ema: A_i = alpha*M_i + (1-alpha)*A_(i-1); "
        "weights: --weights (implied by it)",
    )
    how.add_argument("--alpha", type=float, help="EMA's alpha in (0, 1] (default: 0.2; the PMA paper used 0.1, 0.2)")
    how.add_argument(
        "--weights",
        type=_numbers(float),
        nargs="+",
        metavar="W",
        help="explicit weights, one per checkpoint, oldest first; finite, summing to 1",
    )
    which = parser.add_argument_group("which checkpoints (one of)")
    pick = which.add_mutually_exclusive_group(required=True)
    pick.add_argument("--steps", type=_numbers(int), nargs="+", metavar="S", help="these steps (any order)")
    pick.add_argument("--last", type=int, metavar="N", help="the newest N committed checkpoints")
    which.add_argument(
        "--every",
        type=int,
        metavar="V",
        help="with --last: N steps V apart, counted back from the newest (S, S-V, ...)",
    )
    extra = parser.add_argument_group("output")
    extra.add_argument(
        "--eval",
        action="store_true",
        help="validation loss of the merge and of each input, on the run's validation batches",
    )
    extra.add_argument(
        "--val-batches",
        type=int,
        metavar="N",
        help="with --eval: validation micro-batches per training rank (default: the run's)",
    )
    extra.add_argument(
        "--export-hf",
        action="store_true",
        help="also write OUT/hf: a Hugging Face Llama model (config.json + model.safetensors)",
    )
    extra.add_argument(
        "--keep-optimizer",
        action="store_true",
        help="copy the newest input's optimizer state (never averaged) for --init-optimizer keep",
    )
    extra.add_argument(
        "--progress",
        choices=["bar", "json", "none"],
        default="bar",
        help="bar: a progress line on stderr (default); json: JSON lines on stdout for programs",
    )


def _flatten(values: list[list[Any]] | None) -> list[Any] | None:
    return None if values is None else [v for group in values for v in group]


class _Reporter:
    """Progress as JSON lines on stdout or a bar on stderr, rate-limited; the first and last always shown."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.started = time.perf_counter()
        self._last = 0.0

    def __call__(self, tensors_done: int, tensors_total: int, bytes_done: int, bytes_total: int) -> None:
        now = time.perf_counter()
        final = tensors_done == tensors_total
        if self.mode == "none" or (tensors_done and not final and now - self._last < _PROGRESS_INTERVAL):
            return
        self._last = now
        if self.mode == "json":
            _emit(
                {
                    "event": "progress",
                    "tensors_done": tensors_done,
                    "tensors_total": tensors_total,
                    "bytes_done": bytes_done,
                    "bytes_total": bytes_total,
                }
            )
            return
        fraction = bytes_done / bytes_total if bytes_total else 1.0
        filled = int(fraction * 30)
        sys.stderr.write(
            f"\rmerging [{'#' * filled}{'.' * (30 - filled)}] {fraction:4.0%}  {tensors_done}/{tensors_total} tensors"
            f"  {bytes_done / 1e6:,.0f}/{bytes_total / 1e6:,.0f} MB read  {now - self.started:.1f}s"
        )
        if final:
            sys.stderr.write("\n")
        sys.stderr.flush()


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


class _Interrupted(BaseException):
    """SIGTERM or SIGINT arrived: stop, publish nothing, exit 130."""


def run(args: argparse.Namespace) -> int:
    from megascope.engine.checkpoint.format import CheckpointError
    from megascope.engine.checkpoint.streaming import Stopped

    errors: tuple[type[Exception], ...] = (CheckpointError, OSError)
    if args.eval:  # evaluation needs torch and the model; a plain merge does not import them (1.5 s of start-up)
        from megascope.engine.data import DataError
        from megascope.engine.evaluate import EvalError

        errors += (EvalError, DataError)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            return  # a second signal must not break off the cleanup the first one started
        stop.set()  # the reader thread sees it between reads
        raise _Interrupted()  # the main thread leaves whatever it waits on

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    _unmap_freed_tensors()
    try:
        return _run(args, stop)
    except (_Interrupted, KeyboardInterrupt, Stopped):
        print("megascope merge: interrupted; nothing was published", file=sys.stderr)
        return 130
    except errors as error:
        if args.progress == "bar":
            sys.stderr.write("\n")
        print(f"megascope merge: error: {error}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _unmap_freed_tensors() -> None:
    """Make glibc map every block of 1 MiB or more on its own and unmap it when freed.

    By default glibc raises its mmap threshold as large blocks are freed, then serves tensor-sized blocks from
    its heaps, where freed ones linger: a streaming merge's peak RSS then carries tens of MB of such slack
    (measured: 45-85 MB over the live tensors for 4 MB tensors, varying run to run). With a fixed threshold
    RSS follows the tensors actually alive. A `megascope merge` process exists for the merge alone, so the
    process-wide setting is ours to make; the library call (``merge()``) leaves the allocator as it is.
    """
    with contextlib.suppress(OSError, AttributeError):  # not glibc: its own allocator decides
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # -3: M_MMAP_THRESHOLD


def _run(args: argparse.Namespace, stop: threading.Event) -> int:
    from megascope.engine.checkpoint.merge import MergeError, merge, open_inputs, select_steps

    weights = _flatten(args.weights)
    method = args.method or ("weights" if weights is not None else None)
    if method is None:
        raise MergeError("give --method sma|wma|ema, or --weights W1 .. WN")
    steps = _flatten(args.steps)
    evaluator = None
    input_losses: dict[int, float] = {}
    if args.eval:
        # Set up the evaluation (the run's validation batches) first: if it is impossible, say so before any work.
        from megascope.engine.evaluate import Evaluator

        chosen = select_steps(args.ckpt_dir, steps, args.last, args.every)
        inputs = open_inputs(args.ckpt_dir, chosen)
        evaluator = Evaluator.for_checkpoint(inputs[-1].step_dir, args.val_batches)
    merged_loss: list[float] = []

    def before_publish(step_dir: Path) -> None:
        if evaluator is None:
            return
        if args.progress == "bar":
            print(
                f"evaluating the merge and {len(inputs)} inputs on {len(evaluator.batches)} validation batches",
                file=sys.stderr,
            )
        merged_loss.append(evaluator.loss(step_dir))
        for item in inputs:
            if stop.is_set():
                return
            input_losses[item.step] = evaluator.loss(item.step_dir)

    result = merge(
        args.ckpt_dir,
        args.out,
        method,
        steps=steps,
        last=args.last,
        every=args.every,
        alpha=args.alpha,
        weights=weights,
        keep_optimizer=args.keep_optimizer,
        export_hf=args.export_hf,
        progress=_Reporter(args.progress),
        stop=stop,
        before_publish=before_publish,
    )
    val_loss = merged_loss[0] if merged_loss else None
    if args.progress == "json":
        _emit(
            {
                "event": "done",
                "out": str(result.out.resolve()),
                "steps": result.steps,
                "method": result.method,
                "weights": result.weights,
                "val_loss": val_loss,
                "input_val_losses": {str(step): loss for step, loss in input_losses.items()},
            }
        )
        return 0
    alpha = f" (alpha {result.alpha:g})" if result.alpha is not None else ""
    print(
        f"merged {len(result.steps)} checkpoints by {result.method}{alpha}: "
        f"{result.tensors} tensors, {result.bytes_read / 1e6:,.1f} MB read, {result.bytes_written / 1e6:,.1f} MB "
        f"written in {result.seconds:.2f}s"
    )
    print(f"  {'step':>10}  {'weight':>9}" + (f"  {'val loss':>9}" if evaluator else ""))
    for step, weight in zip(result.steps, result.weights, strict=True):
        loss = f"  {input_losses[step]:>9.4f}" if step in input_losses else ""
        print(f"  {step:>10}  {weight:>9.4f}{loss}")
    if val_loss is not None:
        newest = input_losses[result.steps[-1]]
        best = min(input_losses.values())
        print(
            f"  {'merged':>10}  {'':>9}  {val_loss:>9.4f}   ({val_loss - newest:+.4f} vs the newest input, "
            f"{val_loss - best:+.4f} vs the best input)"
        )
    optimizer = "the newest input's, copied" if args.keep_optimizer else "none (training from it starts a fresh one)"
    print(f"-> {result.step_dir} (optimizer state: {optimizer})")
    if result.hf_dir is not None:
        print(f"-> {result.hf_dir} (Hugging Face Llama: config.json + model.safetensors)")
    print(f"train from it: megascope train --init-from {result.out} ...")
    return 0
