"""What in-place recovery's machinery costs a run without faults, measured where it is spent.

    python bench/recovery_overhead.py [--steps 300] [--ranks 4] [--repeats 3] [--json]

Whole runs in place and with ``--recovery restart`` differ by far more than 1% on a shared 2-core VM from one run
to the next (``bench/faults.py --steady-state`` calls such pairs inconclusive), so the cost is measured inside in-place
runs, as CPU time on the machine's cores over the same window of steps (10 steps in, to 10 before the end), next to
the ranks' own CPU time:

- each rank's watch thread (engine/recovery.py ``StuckWatch``, thread ``megascope-watch``): a read of the recovery
  store every 0.25 s;
- each warm parent after its rank's fork (engine/runtime/warm_parent.py): it waits on a pipe;
- torchrun's process (engine/runtime/elastic.py), which also serves the recovery store those reads go to: counted
  whole (torch elastic's own monitoring included, which ``--recovery restart`` pays too), so an upper bound.

The step's own part of recovery (a ``try`` around it) costs nothing measurable. ``--recovery restart``, the peer,
has none of these processes or threads. Each window's CPU times come from ``/proc/PID/task/TID/schedstat``
(nanoseconds on a CPU, not clock ticks). The job: ``megascope train --nproc-per-node RANKS --preset tiny`` on a
small corpus shipped with Python (the standard library's ``email`` package), no agent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from megascope.engine.recovery import WATCH_THREAD_NAME

WARMUP_STEPS = 10
"""Steps before the window opens (and before the end when it closes): start-up and shut-down are not steady."""


@dataclass(frozen=True)
class Sample:
    """CPU seconds so far, by what spends them (summed over the job's processes of each kind)."""

    ranks: float
    watch: float
    warm_parents: float
    torchrun: float


def _cpu_seconds(pid: int, tid: int | None = None) -> float:
    """Time on a CPU (s) of a process (all its threads) or of one of its threads."""
    path = f"/proc/{pid}/schedstat" if tid is None else f"/proc/{pid}/task/{tid}/schedstat"
    try:
        with open(path) as file:
            return int(file.read().split()[0]) / 1e9
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


def _watch_seconds(pid: int) -> float:
    total = 0.0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/comm") as comm:
                name = comm.read().strip()
        except FileNotFoundError:
            continue
        if name == WATCH_THREAD_NAME:
            total += _cpu_seconds(pid, int(task))
    return total


def _runs(process: psutil.Process, module: str) -> bool:
    try:
        return module in process.cmdline()
    except psutil.Error:
        return False


def sample(job: psutil.Process) -> Sample:
    """The job's CPU seconds so far, by kind: ranks (the warm parents' children), warm parents, torchrun's process."""
    tree = job.children(recursive=True)
    torchrun = [p for p in tree if _runs(p, "megascope.engine.runtime.elastic")]
    guards = [p for p in tree if _runs(p, "megascope.engine.runtime.rank_guard")]
    warm = [
        child for guard in guards for child in guard.children() if _runs(child, "megascope.engine.runtime.warm_parent")
    ]
    ranks = [child for parent in warm for child in parent.children()]
    return Sample(
        ranks=sum(_cpu_seconds(p.pid) for p in ranks),
        watch=sum(_watch_seconds(p.pid) for p in ranks),
        warm_parents=sum(_cpu_seconds(p.pid) for p in warm),
        torchrun=sum(_cpu_seconds(p.pid) for p in torchrun),
    )


def rank0_steps(run_dir: Path) -> int:
    path = run_dir / "telemetry" / "rank0.jsonl"
    if not path.exists():
        return 0
    return path.read_bytes().count(b'"type": "step"')


def one_run(steps: int, ranks: int, work: Path) -> dict[str, float]:
    """One in-place job; the window's CPU seconds by kind, and the window's steps and wall seconds."""
    run_dir = work / f"run-{time.monotonic_ns()}"
    corpus = Path(sysconfig.get_paths()["stdlib"]) / "email"
    command = [
        sys.executable, "-m", "megascope.agent.cli", "train", "--nproc-per-node", str(ranks), "--preset", "tiny",
        "--batch-tokens", "256", "--val-every", "0", "--steps", str(steps), "--data", str(corpus),
        "--no-self-check", "--recovery", "inplace", "--run-dir", str(run_dir),
    ]  # fmt: skip
    with open(work / "train.log", "a") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    job = psutil.Process(process.pid)
    try:
        first: Sample | None = None
        last: Sample | None = None
        opened = closed = 0
        began = ended = 0.0
        while process.poll() is None:
            done = rank0_steps(run_dir)
            if first is None and done >= WARMUP_STEPS:
                first, opened, began = sample(job), done, time.monotonic()
            if first is not None and done < steps - WARMUP_STEPS:
                last, closed, ended = sample(job), done, time.monotonic()
            elif first is not None:
                break
            time.sleep(0.2)
        if process.wait(timeout=300) != 0:
            raise SystemExit(f"the job failed (exit {process.returncode}); its output: {work / 'train.log'}")
    except BaseException:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        raise
    if first is None or last is None or closed <= opened:
        raise SystemExit(f"the window never opened: raise --steps (now {steps}) above {3 * WARMUP_STEPS}")
    return {
        "steps": closed - opened,
        "wall_s": ended - began,
        "ranks_cpu_s": last.ranks - first.ranks,
        "watch_cpu_s": last.watch - first.watch,
        "warm_parents_cpu_s": last.warm_parents - first.warm_parents,
        "torchrun_cpu_s": last.torchrun - first.torchrun,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="steps per run (default: 300)")
    parser.add_argument("--ranks", type=int, default=4, help="ranks on this node (default: 4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs; the figures are their medians (default: 3)")
    parser.add_argument("--json", action="store_true", help="end with one JSON object of the figures")
    args = parser.parse_args()
    if args.steps <= 3 * WARMUP_STEPS or args.ranks < 2 or args.repeats < 1:
        parser.error(f"--steps must be above {3 * WARMUP_STEPS}, --ranks at least 2, --repeats at least 1")
    runs = []
    with tempfile.TemporaryDirectory(prefix="megascope-recovery-overhead-") as work:
        for index in range(args.repeats):
            print(f"run {index + 1}/{args.repeats}: {args.ranks} ranks, {args.steps} steps ...", file=sys.stderr)
            runs.append(one_run(args.steps, args.ranks, Path(work)))

    def share(key: str) -> list[float]:
        return [100 * run[key] / run["ranks_cpu_s"] for run in runs]

    machinery = [100 * (r["watch_cpu_s"] + r["warm_parents_cpu_s"]) / r["ranks_cpu_s"] for r in runs]
    figures = {
        "ranks": args.ranks,
        "steps": args.steps,
        "repeats": args.repeats,
        "window_steps_median": statistics.median(r["steps"] for r in runs),
        "ranks_cpu_s_median": round(statistics.median(r["ranks_cpu_s"] for r in runs), 3),
        "watch_cpu_pct_median": round(statistics.median(share("watch_cpu_s")), 4),
        "warm_parents_cpu_pct_median": round(statistics.median(share("warm_parents_cpu_s")), 4),
        "machinery_cpu_pct_median": round(statistics.median(machinery), 4),
        "machinery_cpu_pct_range": [round(min(machinery), 4), round(max(machinery), 4)],
        "torchrun_process_cpu_pct_median": round(statistics.median(share("torchrun_cpu_s")), 4),
        "runs": runs,
    }
    window = f"step {WARMUP_STEPS} to {args.steps - WARMUP_STEPS}"
    print(f"In-place recovery's machinery, {args.ranks} ranks, {args.repeats} runs of {args.steps} steps "
          f"(window: {window}); CPU time as a share of the ranks' own")  # fmt: skip
    print(f"{'run':>4} {'steps':>6} {'ranks CPU s':>12} {'watch %':>9} {'warm parents %':>15} {'torchrun %':>11}")
    for index, run in enumerate(runs):
        base = run["ranks_cpu_s"]
        watch, warm, torchrun = (100 * run[k] / base for k in ("watch_cpu_s", "warm_parents_cpu_s", "torchrun_cpu_s"))
        print(f"{index + 1:>4} {run['steps']:>6} {base:>12.2f} {watch:>9.4f} {warm:>15.4f} {torchrun:>11.4f}")
    print(
        f"machinery (watch threads + warm parents): {figures['machinery_cpu_pct_median']:.4f}% of the ranks' CPU "
        f"(median; range {min(machinery):.4f}-{max(machinery):.4f}%); goal <= 1%: "
        f"{'met' if figures['machinery_cpu_pct_median'] <= 1 else 'not met'}. torchrun's process, recovery store "
        f"included (an upper bound): {figures['torchrun_process_cpu_pct_median']:.4f}%."
    )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
