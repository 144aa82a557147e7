"""What streaming telemetry to the agent costs training, measured inside one run.

    python bench/telemetry_overhead.py [--steps 400] [--block 10] [--ranks 2] [--json]

Whole runs with and without the agent differ by more than the effect on a shared 2-core VM (the machine's
speed drifts 10-20% between runs), so the comparison is made within one run: the agent launches the ranks
with MEGASCOPE_AGENT_SINK_AB_STEPS=BLOCK, and the ranks stream their step reports to it in even blocks of
BLOCK steps and not in odd ones (heartbeats and events always). Each pair of neighbouring blocks gives a
ratio of median step times (the first step of each block is left out: a report is sent after its step, so
its cost lands in the next one); the overhead is the median ratio - 1 over all pairs, both orders.

The agent process's own cost (sampling the host, storing reports) also falls on these cores; it is reported
as its CPU time over the measured steps as a share of the ranks' CPU time in the same steps.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from megascope.engine.runtime.agent_link import AB_STEPS_ENV
from megascope.engine.runtime.run_dir import telemetry_file
from megascope.engine.summary import read_step_reports

WARMUP_STEPS = 20


def _steps_done(run_dir: Path) -> int:
    path = telemetry_file(run_dir, 0)
    return path.read_text().count('"type": "step"') if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--block", type=int, default=10, help="steps per block (default: 10)")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--batch-tokens", type=int, default=2048, help="as megascope train (default: 2048)")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    args = parser.parse_args()
    if args.block < 3 or args.steps < WARMUP_STEPS + 4 * args.block:
        parser.error("need --block >= 3 and --steps >= 20 + 4 blocks")

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp)
        command = [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--exit-when-done",
                   "--nproc-per-node", str(args.ranks), "--preset", "tiny", "--steps", str(args.steps),
                   "--batch-tokens", str(args.batch_tokens), "--val-every", "0", "--log-every", "100000",
                   "--run-dir", str(run_dir)]  # fmt: skip
        env = dict(os.environ, PYTHONUNBUFFERED="1", **{AB_STEPS_ENV: str(args.block)})
        print(f"$ {AB_STEPS_ENV}={args.block} megascope {' '.join(command[3:])}", file=sys.stderr, flush=True)
        agent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        watched = psutil.Process(agent.pid)
        agent_cpu_at: dict[int, float] = {}  # steps done -> agent CPU seconds then
        while agent.poll() is None:
            try:
                times = watched.cpu_times()
            except psutil.Error:
                break
            agent_cpu_at.setdefault(_steps_done(run_dir), times.user + times.system)
            time.sleep(0.1)
        _, stderr = agent.communicate()
        if agent.returncode != 0:
            raise SystemExit(f"the run failed:\n{stderr[-2000:]}")
        by_step = read_step_reports(run_dir)

    def block_median(block: int) -> float:
        steps = range(block * args.block + 1, (block + 1) * args.block)  # skip each block's first step
        return statistics.median(r["step_seconds"] for s in steps for r in by_step[s])

    first_block = -(-WARMUP_STEPS // args.block)
    blocks = list(range(first_block, args.steps // args.block))
    medians = {
        b: block_median(b) for b in blocks if all(s in by_step for s in range(b * args.block, (b + 1) * args.block))
    }
    # Even blocks stream (on), odd blocks do not (off); compare each block with its neighbour.
    ratios = [
        (medians[a] / medians[b]) if a % 2 == 0 else (medians[b] / medians[a])
        for a, b in zip(sorted(medians), sorted(medians)[1:], strict=False)
    ]
    on = statistics.median(m for b, m in medians.items() if b % 2 == 0)
    off = statistics.median(m for b, m in medians.items() if b % 2 == 1)
    overhead = (statistics.median(ratios) - 1) * 100

    measured = [s for s in agent_cpu_at if s >= WARMUP_STEPS]
    first, last = min(measured), max(measured)
    agent_cpu = agent_cpu_at[last] - agent_cpu_at[first]
    ranks_cpu = sum(r["cpu_seconds"] for s in range(first + 1, last + 1) for r in by_step.get(s, []))
    agent_share = agent_cpu / ranks_cpu * 100

    print(f"\ntiny model, {args.ranks} ranks, {args.steps} steps, blocks of {args.block} alternating, one run")
    print(f"{'':<34}{'median step (ms)':>18}")
    print(f"{'streaming to the agent':<34}{on * 1e3:>18.2f}")
    print(f"{'not streaming (agent idle)':<34}{off * 1e3:>18.2f}")
    print(f"streaming overhead (median of {len(ratios)} neighbouring-block ratios): {overhead:+.2f}% (goal: <= 1%)")
    print(f"agent process CPU: {agent_share:.2f}% of the ranks' CPU over the same steps")
    if args.json:
        print(json.dumps({
            "ranks": args.ranks, "steps": args.steps, "block_steps": args.block, "block_pairs": len(ratios),
            "overhead_percent": overhead, "median_step_seconds_streaming": on,
            "median_step_seconds_not_streaming": off, "agent_cpu_percent_of_ranks": agent_share,
        }))  # fmt: skip


if __name__ == "__main__":
    main()
