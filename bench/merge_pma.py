"""Checkpoint merging in pre-training (PMA), measured: does a merge of constant-LR checkpoints match annealing?

    python bench/merge_pma.py [--preset tiny] [--steps 600] [--every 25] [--decay-steps 150] [--json]

1. Train at a constant learning rate (after the usual warmup; `--decay-steps 0`), saving a checkpoint every
   --every steps (all kept).
2. The same run with the learning rate annealed linearly to zero over the last --decay-steps steps: it resumes
   run 1's checkpoint at step `steps - decay_steps` (resuming is bit-exact, so up to there it *is* run 1) with
   `--decay-steps D --min-lr-ratio 0`.
3. Merge run 1's last N checkpoints (N = 3, 5, 10; spaced --every apart) by SMA, WMA and EMA (alpha 0.1 and
   0.2), and compare validation losses: the last constant-LR checkpoint, each merge, and the annealed run, all
   on the same held-out batches (the run's validation split, --eval-batches micro-batches).

Runs on the CPU with one rank; the defaults take a few minutes on 2 cores. Progress goes to stderr; the table
to stdout; with --json the last stdout line is one JSON object of every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from megascope.engine.checkpoint import committed_steps
from megascope.engine.checkpoint.format import LATEST, step_dir_name
from megascope.engine.checkpoint.merge import merge
from megascope.engine.evaluate import Evaluator
from megascope.engine.summary import summarize

METHODS: tuple[tuple[str, float | None], ...] = (("sma", None), ("wma", None), ("ema", 0.1), ("ema", 0.2))
WINDOWS = (3, 5, 10)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def train(args: argparse.Namespace, ckpt: Path, run: Path, *extra: str) -> float:
    command = [sys.executable, "-m", "megascope.agent.cli", "train", "--preset", args.preset,
               "--steps", str(args.steps), "--lr", str(args.lr), "--batch-tokens", str(args.batch_tokens),
               "--seed", str(args.seed), "--val-every", "0", "--log-every", "50", "--ckpt-dir", str(ckpt),
               "--run-dir", str(run), *extra]  # fmt: skip
    log("$ megascope " + " ".join(command[3:]))
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=sys.stderr)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--every", type=int, default=25, help="checkpoint interval (default: 25)")
    parser.add_argument("--decay-steps", type=int, default=150, help="the annealed run's decay (default: 150)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-tokens", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-batches", type=int, default=40, help="validation micro-batches (default: 40)")
    parser.add_argument("--root", help="work directory (default: a temporary one, removed at the end)")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()
    anneal_start = args.steps - args.decay_steps
    if args.steps // args.every < max(WINDOWS) or anneal_start % args.every or anneal_start <= 0:
        parser.error(
            "need --steps / --every >= 10 checkpoints and --steps - --decay-steps a positive multiple of --every"
        )

    root = Path(args.root or tempfile.mkdtemp(prefix="megascope-pma-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    try:
        constant_s = train(args, root / "constant", root / "constant-run", "--decay-steps", "0",
                           "--ckpt-every", str(args.every), "--ckpt-keep", "0")  # fmt: skip
        # The annealed run is the constant run up to anneal_start (same seed, bit-exact resume), then decays.
        annealed = root / "annealed"
        annealed.mkdir()
        shutil.copytree(root / "constant" / step_dir_name(anneal_start), annealed / step_dir_name(anneal_start))
        (annealed / LATEST).write_text(step_dir_name(anneal_start) + "\n")
        annealed_s = train(args, annealed, root / "annealed-run", "--decay-steps", str(args.decay_steps),
                           "--min-lr-ratio", "0", "--ckpt-every", "0")  # fmt: skip
        saved = committed_steps(root / "constant")
        last = saved[-1]
        evaluator = Evaluator.for_checkpoint(root / "constant", val_batches=args.eval_batches)
        log(f"evaluating on {len(evaluator.batches)} validation micro-batches of {args.batch_tokens} tokens")
        rows: list[dict[str, Any]] = []

        def evaluate(label: str, path: Path, **info: Any) -> None:
            loss = evaluator.loss(path)
            rows.append({"model": label, "val_loss": loss, **info})
            log(f"  {label:<44} {loss:.4f}")

        evaluate(f"constant LR, step {anneal_start}", root / "constant" / step_dir_name(anneal_start))
        evaluate(f"constant LR, last (step {last})", root / "constant" / step_dir_name(last), kind="last")
        merge_seconds = []
        for n in WINDOWS:
            for method, alpha in METHODS:
                out = root / f"merge-{method}{alpha or ''}-{n}"
                result = merge(root / "constant", out, method, last=n, every=args.every, alpha=alpha)
                merge_seconds.append(result.seconds)
                name = f"{method.upper()}{f' a={alpha}' if alpha else ''}"
                evaluate(f"{name} of last {n} ({result.steps[0]}..{result.steps[-1]})", out, kind="merge",
                         method=method, alpha=alpha, n=n, steps=result.steps)  # fmt: skip
        evaluate(f"annealed to 0 over last {args.decay_steps} (step {args.steps})", annealed, kind="annealed")
        constant_summary = summarize(root / "constant-run")
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)

    baseline = next(r["val_loss"] for r in rows if r.get("kind") == "last")
    annealed_loss = next(r["val_loss"] for r in rows if r.get("kind") == "annealed")
    print(f"\nPMA on the {args.preset} preset: {args.steps} steps at constant LR {args.lr:g} (warmup 20), a "
          f"checkpoint every {args.every}; {len(evaluator.batches)} validation batches of {args.batch_tokens} "
          f"tokens; training took {constant_s:.0f}s + {annealed_s:.0f}s (annealed stretch)")  # fmt: skip
    print(f"\n{'model':<44}{'val loss':>10}{'vs last':>10}{'vs annealed':>13}")
    for row in rows:
        print(f"{row['model']:<44}{row['val_loss']:>10.4f}{row['val_loss'] - baseline:>+10.4f}"
              f"{row['val_loss'] - annealed_loss:>+13.4f}")  # fmt: skip
    merges = [r for r in rows if r.get("kind") == "merge"]
    best = min(merges, key=lambda r: r["val_loss"])
    beat_last = sum(r["val_loss"] < baseline for r in merges)
    beat_annealed = sum(r["val_loss"] < annealed_loss for r in merges)
    median_merge = sorted(merge_seconds)[len(merge_seconds) // 2]
    print(f"\n{beat_last} of {len(merges)} merges beat the last checkpoint, {beat_annealed} beat the annealed run; "
          f"best: {best['model']} ({best['val_loss']:.4f}); median merge time {median_merge:.2f}s; "
          f"total {time.perf_counter() - started:.0f}s")  # fmt: skip
    if args.json:
        print(json.dumps({"rows": rows, "last_val_loss": baseline, "annealed_val_loss": annealed_loss,
                          "best_merge": best, "train_seconds": [constant_s, annealed_s],
                          "train_tokens_per_s": constant_summary["tokens_per_s"], "load_average": os.getloadavg(),
                          "settings": {k: v for k, v in vars(args).items() if k != "json"}}))  # fmt: skip


if __name__ == "__main__":
    main()
