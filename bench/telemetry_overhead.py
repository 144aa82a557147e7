"""What attaching the agent costs training: the same run with and without it, interleaved, median step time.

    python bench/telemetry_overhead.py [--repeats 5] [--steps 80] [--ranks 2] [--json]

"without": `megascope train` (ranks write JSONL telemetry only). "with": `megascope agent --exit-when-done`
launching the same ranks, which then also stream every step report, heartbeats and events to the agent over
gRPC, while the agent samples the host once a second and serves its history. Both modes run in alternation
(ABAB..., the order flipped each repeat) so drift in the machine's speed hits both alike. Per run: the median
step time over both ranks after a warm-up; per mode: the median over runs. The overhead is their ratio - 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from megascope.engine.summary import read_step_reports

WARMUP_STEPS = 10


def one_run(mode: str, args: argparse.Namespace, run_dir: Path) -> float:
    common = ["--nproc-per-node", str(args.ranks), "--preset", "tiny", "--steps", str(args.steps),
              "--batch-tokens", str(args.batch_tokens), "--val-every", "0", "--log-every", "1000",
              "--run-dir", str(run_dir)]  # fmt: skip
    if mode == "without":
        command = [sys.executable, "-m", "megascope.agent.cli", "train", *common]
    else:
        command = [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--exit-when-done", *common]
    result = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    if result.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{result.stderr[-2000:]}")
    by_step = read_step_reports(run_dir)
    times = [r["step_seconds"] for step, reports in by_step.items() if step > WARMUP_STEPS for r in reports]
    if len(times) < args.ranks * (args.steps - WARMUP_STEPS):
        raise SystemExit(f"{mode} run reported {len(times)} step times, expected {args.ranks * (args.steps - 10)}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=80)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must exceed the {WARMUP_STEPS} warm-up steps")

    medians: dict[str, list[float]] = {"without": [], "with": []}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = ("without", "with") if repeat % 2 == 0 else ("with", "without")
            for mode in order:
                median = one_run(mode, args, Path(tmp) / f"{mode}-{repeat}")
                medians[mode].append(median)
                print(
                    f"repeat {repeat + 1}/{args.repeats} {mode:>7} agent: median step {median * 1000:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )

    without, with_agent = statistics.median(medians["without"]), statistics.median(medians["with"])
    overhead = with_agent / without - 1.0
    print(f"\ntiny model, {args.ranks} ranks, {args.steps} steps x {args.repeats} repeats, interleaved")
    print(f"{'mode':<16}{'median step (ms)':>18}{'runs (ms)':>40}")
    for mode, label in (("without", "without agent"), ("with", "with agent")):
        runs = " ".join(f"{m * 1000:.1f}" for m in medians[mode])
        print(f"{label:<16}{statistics.median(medians[mode]) * 1000:>18.2f}{runs:>40}")
    print(f"overhead: {overhead * 100:+.2f}% (goal: <= 1%)")
    if args.json:
        print(json.dumps({
            "ranks": args.ranks, "steps": args.steps, "repeats": args.repeats,
            "median_step_seconds_without_agent": without, "median_step_seconds_with_agent": with_agent,
            "runs_without_agent": medians["without"], "runs_with_agent": medians["with"],
            "overhead_percent": overhead * 100,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
