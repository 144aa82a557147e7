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

The public API (``megascope.api.step()``, what a user's own loop or a framework callback calls) is measured apart,
in a plain loop whose "step" is a short sleep (the step's work, off the CPU, so that only megascope's cost is
counted): the loop alternates blocks of --api-block steps that call ``step(loss=<0-d tensor>, tokens=...)`` with
blocks that do not, and the cost per step is the median, over neighbouring pairs, of the difference in CPU time per
step. It is measured on the loop's own thread (what the training loop pays) and for the whole process (adding
megascope's telemetry thread, which builds and sends the report), once as a rank of a real agent
(``megascope agent -- <this file> --api-worker ...``) and once with no agent (the API then does nothing), each
--api-repeats times, the two interleaved; the figures are medians over the repeats. The goal is < 20 us of the
loop's CPU per step and <= 1% of the step time of the configuration above.
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
API_WARMUP_BLOCKS = 2
API_CONNECT_SECONDS = 20.0


def _api_worker(out: Path, steps: int, block: int, pause: float) -> None:
    """The plain loop (see the module docstring); writes its per-pair costs to ``out`` as JSON."""
    import torch

    import megascope.api as megascope

    run = megascope.init()
    deadline = time.monotonic() + API_CONNECT_SECONDS
    while run.agent is not None and not run.agent.connected and time.monotonic() < deadline:
        time.sleep(0.05)  # until connected the API drops reports, which costs less than sending them
    under_agent = run.agent is not None
    if under_agent and not run.agent.connected:
        raise SystemExit("the API did not connect to the agent")
    loss = torch.tensor(2.5)
    blocks: list[tuple[bool, float, float]] = []  # (calls step(), loop thread CPU, process CPU) per block
    for number in range(steps // block):
        calls = number % 2 == 0
        thread, process = time.thread_time(), time.process_time()
        for _ in range(block):
            time.sleep(pause)
            if calls:
                megascope.step(loss=loss, tokens=2048)
        blocks.append((calls, time.thread_time() - thread, time.process_time() - process))
    measured = blocks[API_WARMUP_BLOCKS:]
    loop_costs, process_costs = [], []
    for a, b in zip(measured, measured[1:], strict=False):
        on, off = (a, b) if a[0] else (b, a)
        loop_costs.append((on[1] - off[1]) / block)
        process_costs.append((on[2] - off[2]) / block)
    out.write_text(json.dumps({
        "under_agent": under_agent, "active": run.active, "errors": run.errors,
        "loop_seconds_per_step": statistics.median(loop_costs),
        "process_seconds_per_step": statistics.median(process_costs),
        "dropped": run.agent.dropped if run.agent is not None else 0,
    }))  # fmt: skip


def _api_run(with_agent: bool, steps: int, block: int, pause: float) -> dict[str, float]:
    """One run of the plain loop, as the only rank of a real agent or with none."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.json"
        worker = [__file__, "--api-worker", str(out), "--api-steps", str(steps), "--api-block", str(block),
                  "--api-pause", str(pause)]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("MEGASCOPE_")}
        if with_agent:
            command = [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--exit-when-done",
                       "--nproc-per-node", "1", "--run-dir", str(Path(tmp) / "run"), "--", *worker]  # fmt: skip
        else:
            command = [sys.executable, *worker]
        result = subprocess.run(command, capture_output=True, text=True, env=dict(env, PYTHONUNBUFFERED="1"))
        if result.returncode != 0 or not out.exists():
            raise SystemExit(
                f"the API loop failed ({'under an agent' if with_agent else 'alone'}):\n{result.stderr[-2000:]}"
            )
        figures: dict[str, float] = json.loads(out.read_text())
    if figures["active"] != with_agent or figures["errors"]:
        raise SystemExit(f"the API loop did not run as intended: {figures}")
    return figures


def _api_overhead(repeats: int, steps: int, block: int, pause: float) -> dict[str, float]:
    runs: dict[bool, list[dict[str, float]]] = {True: [], False: []}
    for repeat in range(repeats):
        for with_agent in (True, False) if repeat % 2 == 0 else (False, True):  # interleaved, both orders
            print(f"  API loop {repeat + 1}/{repeats}, {'under an agent' if with_agent else 'no agent'}",
                  file=sys.stderr, flush=True)  # fmt: skip
            runs[with_agent].append(_api_run(with_agent, steps, block, pause))

    def median(with_agent: bool, key: str) -> float:
        return statistics.median(run[key] for run in runs[with_agent])

    return {
        "api_loop_us_per_step_agent": median(True, "loop_seconds_per_step") * 1e6,
        "api_process_us_per_step_agent": median(True, "process_seconds_per_step") * 1e6,
        "api_loop_us_per_step_no_agent": median(False, "loop_seconds_per_step") * 1e6,
        "api_reports_dropped": sum(run["dropped"] for run in runs[True]),
    }


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
    parser.add_argument("--api-only", action="store_true", help="measure only the public API's plain loop")
    parser.add_argument("--api-repeats", type=int, default=3, help="runs of the API loop per condition (default: 3)")
    parser.add_argument("--api-steps", type=int, default=2000, help="steps of each API loop run (default: 2000)")
    parser.add_argument("--api-block", type=int, default=50, help="steps per API loop block (default: 50)")
    parser.add_argument("--api-pause", type=float, default=0.002, help="the API loop's step, slept (default: 0.002)")
    parser.add_argument("--api-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.api_worker is not None:
        _api_worker(args.api_worker, args.api_steps, args.api_block, args.api_pause)
        return
    if args.api_steps < (API_WARMUP_BLOCKS + 4) * args.api_block:
        parser.error("need --api-steps >= 6 API blocks")
    if args.api_only:
        api = _api_overhead(args.api_repeats, args.api_steps, args.api_block, args.api_pause)
        _print_api(api, step_seconds=None)
        if args.json:
            print(json.dumps(api))
        return
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
    api = _api_overhead(args.api_repeats, args.api_steps, args.api_block, args.api_pause)
    api["api_percent_of_step"] = api["api_loop_us_per_step_agent"] * 1e-6 / off * 100
    _print_api(api, step_seconds=off)
    if args.json:
        print(json.dumps({
            "ranks": args.ranks, "steps": args.steps, "block_steps": args.block, "block_pairs": len(ratios),
            "overhead_percent": overhead, "median_step_seconds_streaming": on,
            "median_step_seconds_not_streaming": off, "agent_cpu_percent_of_ranks": agent_share, **api,
        }))  # fmt: skip


def _print_api(api: dict[str, float], step_seconds: float | None) -> None:
    print("\nmegascope.api.step() in a plain loop, CPU per step (median of the runs' medians of block pairs)")
    print(f"{'under an agent, the loop thread':<44}{api['api_loop_us_per_step_agent']:>8.1f} us (goal: < 20 us)")
    print(f"{'under an agent, the whole process':<44}{api['api_process_us_per_step_agent']:>8.1f} us"
          "  (adds megascope's thread: the report built and sent)")  # fmt: skip
    print(f"{'no agent (the API does nothing)':<44}{api['api_loop_us_per_step_no_agent']:>8.2f} us")
    if step_seconds is not None:
        print(f"the loop thread's cost is {api['api_percent_of_step']:.4f}% of the {step_seconds * 1e3:.0f} ms step"
              " above (goal: <= 1%)")  # fmt: skip


if __name__ == "__main__":
    main()
