"""How well the straggler rules find stragglers, how fast they run, and whether the dashboard keeps up at 4,096 ranks.

    python bench/stragglers.py [--quick] [--json] [--dashboard-seconds 60] [--no-dashboard]

1. **Detection**, on a simulated synchronous job (tests/support/straggler_sim.py: no training, per-rank timings with
   2% step-to-step jitter, one-step spikes and GC pauses) of 8 to 4,096 ranks, 8 per node. Each run injects
   persistent slowdowns of 5% to 100% (40 to 120 steps, in compute, data loading, GC or host time, now and
   then a whole node) and transient bursts shorter than the persistence window (1 to ``window - 1`` steps,
   20% to 200%), which must not be flagged. Scored against that ground truth:
   - recall: persistent slowdowns of at least 10% flagged while they last (or within ``window + grace`` steps of
     their end), over all such slowdowns (each rank of a slow node counts once);
   - precision: flags that match a persistent slowdown of that rank (5% ones included), over all flags;
   - F1; the median detection delay in steps (flag step minus the first slow step);
   - false flags on clean runs (no injection) of every size.
2. **Cost of the rules**: milliseconds per step at 4,096 ranks (``StragglerDetector.observe_arrays``).
3. **The dashboard at 4,096 ranks**: ``python -m support.fake_agent`` serves 64 nodes x 64 ranks stepping at
   about 1 Hz (rank 4,095 a 30% straggler) from another process; the real ``DashboardApp`` (headless, Textual's
   ``run_test``) watches all 64 agents for ``--dashboard-seconds``, half on the main screen and half on the heat
   map. Reported: frames drawn against redraw ticks, the longest gap between frames, the time a frame takes,
   the dashboard process's CPU use, and whether the straggler was flagged. The tick counts as held when at
   least 90% of the ticks drew a frame and no gap between frames exceeded three ticks (one second).

The last stdout line with ``--json`` is one object: ``precision``, ``recall``, ``f1``, ``false_flags_clean``,
``median_delay_steps``, ``rules_ms_per_step_4096`` and ``dashboard_4096`` (its figures).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # the simulator and the fake agent live in tests/

from support.straggler_sim import Part, SimCluster, Slowdown, feed  # noqa: E402

from megascope.dashboard import app as dashboard_app  # noqa: E402
from megascope.dashboard.app import DashboardApp  # noqa: E402
from megascope.dashboard.model.cluster import ClusterModel  # noqa: E402
from megascope.dashboard.model.stragglers import DEFAULT_CONFIG, StragglerDetector  # noqa: E402
from megascope.dashboard.screens.main import HeatMapScreen  # noqa: E402
from megascope.protos.megascope.v1 import telemetry_pb2  # noqa: E402

RANKS_PER_NODE = 8
FACTORS = (1.05, 1.10, 1.15, 1.20, 1.30, 1.50, 2.00)
PARTS: tuple[Part, ...] = ("compute", "compute", "compute", "data", "gc", "host")
GOAL_FACTOR = 1.10
"""Recall, F1 and delay are scored on slowdowns at least this large (the issue's goal); 5% ones are reported apart."""


# -- 1. detection on a simulated cluster ----------------------------------------------------------------------


@dataclass
class Episode:
    rank: int
    factor: float
    start: int
    end: int
    """First step after the slowdown."""
    detected_at: int | None = None


@dataclass
class Score:
    size: int
    runs: int = 0
    flags: int = 0
    true_flags: int = 0
    episodes: list[Episode] = field(default_factory=list)

    @property
    def goal_episodes(self) -> list[Episode]:
        return [e for e in self.episodes if e.factor >= GOAL_FACTOR]


def make_run(ranks: int, seed: int, steps: int) -> tuple[SimCluster, list[Slowdown]]:
    """A run with persistent slowdowns (ground truth) and transient bursts (must not be flagged)."""
    rng = random.Random(seed)
    nodes = max(1, ranks // RANKS_PER_NODE)
    free = list(range(ranks))
    rng.shuffle(free)
    persistent: list[Slowdown] = []
    for _ in range(min(4, 1 + ranks // 256)):
        duration = rng.randint(40, 120)
        start = rng.randint(30, max(31, steps - duration - 10))
        persistent.append(Slowdown((free.pop(),), rng.choice(FACTORS), start, duration, rng.choice(PARTS)))
    if nodes >= 4 and rng.random() < 0.5:  # a whole slow node
        node = rng.randrange(nodes)
        members = tuple(r for r in range(node * RANKS_PER_NODE, (node + 1) * RANKS_PER_NODE))
        free = [r for r in free if r not in members]
        persistent.append(Slowdown(members, rng.choice(FACTORS[2:]), rng.randint(30, steps - 130), 100))
    shorter = DEFAULT_CONFIG.window - 1
    transient = [
        Slowdown((free.pop(),), rng.uniform(1.2, 3.0), rng.randint(30, steps - 10), rng.randint(1, shorter))
        for _ in range(rng.randint(2, 6))
    ]
    jitter = rng.uniform(0.01, 0.03)
    cluster = SimCluster(nodes, RANKS_PER_NODE if ranks >= RANKS_PER_NODE else ranks, seed=seed, jitter=jitter,
                         slowdowns=persistent + transient)  # fmt: skip
    return cluster, persistent


def score_run(score: Score, ranks: int, seed: int, steps: int) -> None:
    cluster, persistent = make_run(ranks, seed, steps)
    episodes = [Episode(rank, s.factor, s.start, s.start + s.steps) for s in persistent for rank in s.ranks]
    changes = feed(StragglerDetector(), cluster, range(1, steps + 1))
    late = DEFAULT_CONFIG.lookback
    score.runs += 1
    for step, result in changes:
        for flag in result.raised:
            score.flags += 1
            match = next((e for e in episodes if e.rank == flag.rank and e.start <= step <= e.end + late), None)
            if match is not None:
                score.true_flags += 1
                if match.detected_at is None:
                    match.detected_at = step
    score.episodes.extend(episodes)


def clean_false_flags(ranks: int, seed: int, steps: int) -> int:
    cluster = SimCluster(max(1, ranks // RANKS_PER_NODE), min(ranks, RANKS_PER_NODE), seed=seed)
    return sum(len(result.raised) for _, result in feed(StragglerDetector(), cluster, range(1, steps + 1)))


# -- 2. cost of the rules --------------------------------------------------------------------------------------


def rules_ms_per_step(ranks: int, steps: int) -> tuple[float, float]:
    """Median and 95th percentile milliseconds of one step of the rules at ``ranks`` ranks."""
    cluster = SimCluster(ranks // RANKS_PER_NODE, RANKS_PER_NODE, seed=0, slowdowns=[Slowdown((7,), 1.3, 20, 10_000)])
    timings = [cluster.step(s) for s in range(1, steps + 1)]
    rank_ids, nodes = list(range(ranks)), cluster.rank_nodes()
    detector = StragglerDetector()
    elapsed = []
    for step, t in enumerate(timings, 1):
        # The dashboard builds these lists from the step reports; the rules take them as they come.
        columns = [t[k].tolist() for k in ("step_seconds", "compute_seconds", "data_wait_seconds",
                                            "comm_wait_seconds", "gc_pause_seconds")]  # fmt: skip
        start = time.perf_counter()
        detector.observe_arrays(step, rank_ids, nodes, *columns, None, float(step))
        elapsed.append(time.perf_counter() - start)
    measured = sorted(elapsed[20:])
    return 1000 * statistics.median(measured), 1000 * measured[int(0.95 * (len(measured) - 1))]


# -- 3. the dashboard at 4,096 ranks ----------------------------------------------------------------------------


class TimedModel(ClusterModel):
    """The cluster model, timing its ingest (the data side of the dashboard)."""

    ingest_seconds = 0.0

    def ingest(self, address: str, telemetry: telemetry_pb2.Telemetry) -> None:
        start = time.perf_counter()
        super().ingest(address, telemetry)
        self.ingest_seconds += time.perf_counter() - start


class TimedApp(DashboardApp):
    """The dashboard, noting when each frame was drawn and how long drawing it took."""

    # Textual resolves a relative CSS_PATH against the subclass's own file: point it at the dashboard's.
    CSS_PATH = str(Path(dashboard_app.__file__).with_name("app.tcss"))

    def __init__(self, agents: list[str], model: ClusterModel) -> None:
        super().__init__(agents, model=model)
        self.frame_times: list[float] = []
        self.frame_seconds: list[float] = []

    def refresh_view(self) -> None:
        before, start = self.frames, time.perf_counter()
        super().refresh_view()
        if self.frames > before:
            self.frame_times.append(time.monotonic())
            self.frame_seconds.append(time.perf_counter() - start)


async def dashboard_at_scale(nodes: int, ranks_per_node: int, seconds: float) -> dict[str, Any]:
    ranks = nodes * ranks_per_node
    # SyntheticNode's step with a 30% straggler lasts 0.95 * 1.02 * 1.3 + 0.05 = 1.31 step_seconds: about 1 Hz.
    step_seconds = 1.0 / 1.31
    agents = subprocess.Popen(
        [sys.executable, "-m", "support.fake_agent", "--nodes", str(nodes), "--ranks-per-node", str(ranks_per_node),
         "--steps", "1000000", "--step-seconds", f"{step_seconds:.4f}"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert agents.stdout is not None
        addresses = [agents.stdout.readline().rsplit(" ", 1)[-1].strip() for _ in range(nodes)]
        model = TimedModel()
        app = TimedApp(addresses, model)
        me = psutil.Process()
        async with app.run_test(size=(160, 48)) as pilot:
            deadline = time.monotonic() + 120
            while model.header().known_ranks < ranks or model.header().step is None:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"only {model.header().known_ranks} of {ranks} ranks appeared in 120 s")
                await pilot.pause(0.5)
            started, cpu, ingest = time.monotonic(), me.cpu_times(), model.ingest_seconds
            app.frame_times.clear()
            app.frame_seconds.clear()
            first_step = model.stragglers.last_step or 0
            await pilot.pause(seconds / 2)
            main_frame_ms = 1000 * statistics.median(app.frame_seconds) if app.frame_seconds else None
            heat_from = len(app.frame_seconds)
            await pilot.press("h")
            while not isinstance(app.screen, HeatMapScreen):
                await pilot.pause(0.05)
            await pilot.pause(seconds / 2)
            wall = time.monotonic() - started
            used = me.cpu_times()
            heat_frames = app.frame_seconds[heat_from:]
            heat_frame_ms = 1000 * statistics.median(heat_frames) if heat_frames else None
            frame_times = list(app.frame_times)
            judged = (model.stragglers.last_step or 0) - first_step
            flagged = sorted({flag.rank for flag in model.straggler_flags()})
            newest = max((r.step for r in model.rank_rows() if r.step is not None), default=0)
            lag = newest - (model.stragglers.last_step or 0)
            ingest_share = (model.ingest_seconds - ingest) / wall
    finally:
        agents.terminate()
        agents.wait(10)
    ticks = wall / app.tick_seconds
    gaps = [b - a for a, b in zip(frame_times, frame_times[1:], strict=False)]
    cpu_seconds = (used.user - cpu.user) + (used.system - cpu.system)
    return {
        "ranks": ranks,
        "agents": nodes,
        "seconds": round(wall, 1),
        "steps_judged": judged,
        "judge_lag_steps": lag,
        "frames": len(frame_times),
        "ticks": round(ticks, 1),
        "frames_per_tick": round(len(frame_times) / ticks, 3),
        "max_gap_seconds": round(max(gaps), 3) if gaps else None,
        "main_frame_ms": round(main_frame_ms, 1) if main_frame_ms is not None else None,
        "heat_map_frame_ms": round(heat_frame_ms, 1) if heat_frame_ms is not None else None,
        "tick_held": bool(gaps) and len(frame_times) >= 0.9 * ticks and max(gaps) <= 3 * app.tick_seconds,
        "cpu_percent": round(100 * cpu_seconds / wall, 1),
        "ingest_cpu_percent": round(100 * ingest_share, 1),
        "flagged": flagged,
        "straggler_flagged": ranks - 1 in flagged,
    }


# -- report ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes and short runs, to check the bench works")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    parser.add_argument("--dashboard-seconds", type=float, default=60.0, help="dashboard measurement (default: 60)")
    parser.add_argument("--no-dashboard", action="store_true", help="skip the 4,096-rank dashboard part")
    args = parser.parse_args()

    if args.quick:
        plan, steps, clean_steps, rules_steps, board = {8: 4, 64: 2, 512: 1}, 250, 500, 100, (8, 32)
    else:
        plan, steps, clean_steps, rules_steps, board = {8: 40, 64: 20, 512: 6, 4096: 2}, 300, 2000, 400, (64, 64)

    scores = []
    for size, runs in plan.items():
        score = Score(size)
        for seed in range(runs):
            score_run(score, size, 1000 * size + seed, steps)
        scores.append(score)
    clean = {size: sum(clean_false_flags(size, 7 + seed, clean_steps) for seed in range(2)) for size in plan}
    rules_median, rules_p95 = rules_ms_per_step(4096, rules_steps)

    print(f"Straggler detection on a simulated synchronous job ({steps} steps a run; goal: slowdowns >= 10%)")
    header = f"{'ranks':>6} {'runs':>5} {'slowdowns':>10} {'recall':>7} {'flags':>6} {'precision':>10} {'F1':>6} "
    print(header + f"{'median delay':>13} {'recall 5%':>10} {'clean flags':>12}")
    all_goal: list[Episode] = []
    total_flags = total_true = 0
    for score in scores:
        goal = score.goal_episodes
        found = [e for e in goal if e.detected_at is not None]
        small = [e for e in score.episodes if e.factor < GOAL_FACTOR]
        recall = len(found) / len(goal) if goal else float("nan")
        precision = score.true_flags / score.flags if score.flags else float("nan")
        f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else float("nan")
        delay = statistics.median(e.detected_at - e.start for e in found) if found else float("nan")  # type: ignore[operator]
        small_recall = (sum(e.detected_at is not None for e in small) / len(small)) if small else float("nan")
        print(f"{score.size:>6} {score.runs:>5} {len(goal):>10} {recall:>7.3f} {score.flags:>6} {precision:>10.3f} "
              f"{f1:>6.3f} {delay:>13.1f} {small_recall:>10.2f} {clean[score.size]:>12}")  # fmt: skip
        all_goal += goal
        total_flags += score.flags
        total_true += score.true_flags
    found = [e for e in all_goal if e.detected_at is not None]
    recall = len(found) / len(all_goal)
    precision = total_true / total_flags if total_flags else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    delay = float(statistics.median(e.detected_at - e.start for e in found)) if found else float("nan")  # type: ignore[operator]
    clean_total = sum(clean.values())
    print(f"{'all':>6} {sum(s.runs for s in scores):>5} {len(all_goal):>10} {recall:>7.3f} {total_flags:>6} "
          f"{precision:>10.3f} {f1:>6.3f} {delay:>13.1f} {'':>10} {clean_total:>12}")  # fmt: skip
    print(f"(clean runs: 2 x {clean_steps} steps per size, no slowdown injected)")
    print(f"\nRules: {rules_median:.2f} ms per step at 4,096 ranks (95th percentile {rules_p95:.2f} ms)")

    dashboard: dict[str, Any] | None = None
    if not args.no_dashboard:
        seconds = min(args.dashboard_seconds, 20.0) if args.quick else args.dashboard_seconds
        dashboard = asyncio.run(dashboard_at_scale(*board, seconds))
        d = dashboard
        print(
            f"\nDashboard: {d['ranks']:,} ranks on {d['agents']} agents stepping at ~1 Hz, {d['seconds']} s "
            "(half on the main screen, half on the heat map)"
        )
        print(
            f"  redraw: {d['frames']} frames for {d['ticks']} ticks, longest gap {d['max_gap_seconds']} s, "
            f"tick held: {d['tick_held']}"
        )
        print(
            f"  a frame takes {d['main_frame_ms']} ms on the main screen, {d['heat_map_frame_ms']} ms on the heat map"
        )
        print(f"  CPU: {d['cpu_percent']}% of a core ({d['ingest_cpu_percent']}% taking in telemetry)")
        print(
            f"  rules: {d['steps_judged']} steps judged, {d['judge_lag_steps']} behind the newest report; "
            f"straggler rank {d['ranks'] - 1} flagged: {d['straggler_flagged']} (flagged: {d['flagged'][:8]})"
        )
        print()  # fmt: skip

    if args.json:
        summary = {
            "precision": round(precision, 4),
            "recall": round(recall, 4),
            "f1": round(f1, 4),
            "false_flags_clean": clean_total,
            "median_delay_steps": delay,
            "rules_ms_per_step_4096": round(rules_median, 3),
            "dashboard_4096": dashboard,
            "quick": args.quick,
        }
        print(json.dumps(summary))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
