"""What the /metrics page and the alert webhooks cost an agent (issue 15's goals: +0.1% of a core at 4 ranks; a
scrape of an agent holding 64 ranks < 50 ms).

    python bench/metrics.py [--json] [--scrapes 50] [--agents] [--steps 300] [--repeats 2]

1. Scrape at 64 ranks: a node state holding 64 ranks with a full history (200 steps each, 8 GPUs' samples, events),
   served by the real MetricsServer; each scrape is a real HTTP GET through the agent's loop and the collector. The
   figures are the median and the 95th percentile over --scrapes.
2. The steady cost at 4 ranks, measured piece by piece in-process, because a whole-run A/B of the agent's CPU on a
   shared 2-core VM varies by more than the effect: the alert watcher's check (every 0.5 s) and one scrape's page
   (read from the state and rendered, every 15 s, Prometheus' default interval), each timed in CPU seconds over many
   calls, give the share of a core (the HTTP exchange itself is left out).
3. With --agents, also the whole-run figure: real agents running the same 4-rank job, with and without
   ``--metrics-port 0 --alert-webhook`` (scraped every second, 15x Prometheus' default, against a local webhook),
   interleaved --repeats times; the agent process's own CPU seconds per wall second, as a share of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import psutil
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from megascope.agent.alerts import AlertService
from megascope.agent.metrics import MetricsServer, NodeMetrics
from megascope.agent.state import NodeState
from megascope.protos.megascope.v1 import telemetry_pb2 as pb
from megascope.protos.megascope.v1 import worker_pb2

SCRAPE_INTERVAL_SECONDS = 15.0
"""Prometheus' default scrape_interval."""
ALERT_POLL_SECONDS = 0.5


def node(ranks: int, steps: int, gpus: int) -> NodeState:
    state = NodeState(pb.NodeInfo(node="bench", agent_version="bench"))
    for rank in range(ranks):
        state.rank_attached(worker_pb2.Hello(rank=rank, pid=1000 + rank, world_size=ranks))
        state.event("started", pb.RunDetail(phase=pb.RunDetail.PHASE_STARTED, device=f"cuda:{rank % gpus}"), rank=rank)
    for step in range(steps):
        for rank in range(ranks):
            state.add_step(
                pb.StepReport(
                    rank=rank, step=step, loss=2.0, step_seconds=0.1, forward_seconds=0.03, backward_seconds=0.05,
                    tokens_per_second=1e5, mfu=0.4, wall_time=time.time(),
                )
            )  # fmt: skip
        if step % 10 == 0:
            state.add_host_sample(pb.HostSample(cpu_percent=50.0, memory_total_bytes=1 << 40))
            state.add_gpu_samples([pb.GpuSample(index=i, temperature_celsius=60.0) for i in range(gpus)])
            state.event("saved", pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_SAVED, step=step))
    return state


async def scrape_times(ranks: int, scrapes: int) -> list[float]:
    server = MetricsServer(NodeMetrics(node(ranks, 200, 8)), "127.0.0.1", 0)
    server.start()

    def get() -> float:
        started = time.perf_counter()
        with urllib.request.urlopen(server.url, timeout=30) as response:
            response.read()
        return time.perf_counter() - started

    try:
        await asyncio.to_thread(get)  # the first scrape reads every event once
        return [await asyncio.to_thread(get) for _ in range(scrapes)]
    finally:
        await server.stop()


async def steady_cost(ranks: int) -> dict[str, float]:
    """CPU seconds of one alert check and one collect at ``ranks`` ranks, on a node that keeps training."""
    state = node(ranks, 200, ranks)
    metrics = NodeMetrics(state)
    alerts = AlertService(state, ["http://127.0.0.1:9/never"])  # never started: check() alone is timed
    metrics.collect()
    step = 200

    def advance() -> None:
        nonlocal step
        step += 1
        for rank in range(ranks):
            state.add_step(pb.StepReport(rank=rank, step=step, step_seconds=0.1))

    def cpu_per_call(call: Any, calls: int) -> float:
        total = 0.0
        for _ in range(calls):
            advance()  # what changes between two calls in a real run
            started = time.process_time()
            call()
            total += time.process_time() - started
        return total / calls

    class Direct(Collector):
        def collect(self) -> list[Metric]:
            return metrics.collect()

    registry = CollectorRegistry(auto_describe=False)
    registry.register(Direct())
    check = cpu_per_call(alerts.check, 5000)
    collect = cpu_per_call(lambda: generate_latest(registry), 500)  # reading the state and writing the page
    return {
        "alert_check_cpu_us": check * 1e6,
        "scrape_collect_cpu_ms": collect * 1e3,
        "steady_core_percent": (check / ALERT_POLL_SECONDS + collect / SCRAPE_INTERVAL_SECONDS) * 100,
    }


def agent_cpu(ops: bool, steps: int, hook: str) -> float:
    """The agent's own CPU (not its ranks') per wall second, in percent of a core, over one 4-rank run."""
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--exit-when-done",
                   "--nproc-per-node", "4", "--preset", "tiny", "--steps", str(steps), "--batch-tokens", "512",
                   "--val-every", "0", "--run-dir", tmp]  # fmt: skip
        if ops:
            command += ["--metrics-port", "0", "--alert-webhook", hook]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        agent = psutil.Process(process.pid)
        url = None
        assert process.stdout is not None
        for line in process.stdout:
            if "metrics on" in line:
                url = line.split()[-1]
            if not ops or url:
                break
        threading.Thread(target=lambda: process.stdout and process.stdout.read(), daemon=True).start()
        started, cpu0 = time.monotonic(), agent.cpu_times()
        last = (started, cpu0.user + cpu0.system)
        while process.poll() is None:
            if url:
                try:
                    with urllib.request.urlopen(url, timeout=10) as response:
                        response.read()
                except OSError:
                    pass
            try:
                times = agent.cpu_times()
                last = (time.monotonic(), times.user + times.system)
            except psutil.NoSuchProcess:
                break
            time.sleep(1.0)
        return (last[1] - (cpu0.user + cpu0.system)) / (last[0] - started) * 100


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON object of the figures")
    parser.add_argument("--scrapes", type=int, default=50)
    parser.add_argument("--agents", action="store_true", help="also run real agents with the ops stack on and off")
    parser.add_argument("--steps", type=int, default=300, help="steps of each --agents run (default: 300)")
    parser.add_argument("--repeats", type=int, default=2, help="--agents runs per condition (default: 2)")
    args = parser.parse_args()

    times = asyncio.run(scrape_times(64, args.scrapes))
    figures: dict[str, Any] = {
        "scrape_64_ranks_median_ms": statistics.median(times) * 1e3,
        "scrape_64_ranks_p95_ms": sorted(times)[int(0.95 * (len(times) - 1))] * 1e3,
    }
    print(
        f"scrape of 64 ranks: median {figures['scrape_64_ranks_median_ms']:.1f} ms, "
        f"p95 {figures['scrape_64_ranks_p95_ms']:.1f} ms (goal < 50 ms)"
    )
    steady = asyncio.run(steady_cost(4))
    figures.update({f"{key}_4_ranks": value for key, value in steady.items()})
    print(
        f"4 ranks: alert check {steady['alert_check_cpu_us']:.1f} us CPU every {ALERT_POLL_SECONDS} s, scrape "
        f"{steady['scrape_collect_cpu_ms']:.2f} ms CPU every {SCRAPE_INTERVAL_SECONDS:g} s: "
        f"{steady['steady_core_percent']:.4f}% of a core (goal +0.1%)"
    )
    if args.agents:
        received = []

        class Hook(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                received.append(self.rfile.read(int(self.headers["Content-Length"])))
                self.send_response(200)
                self.end_headers()

            def log_message(self, format: str, *a: Any) -> None:  # noqa: A002
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Hook)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        hook = f"http://127.0.0.1:{server.server_address[1]}/hook"
        off, on = [], []
        for _ in range(args.repeats):
            off.append(agent_cpu(False, args.steps, hook))
            on.append(agent_cpu(True, args.steps, hook))
        server.shutdown()
        figures.update({
            "agent_cpu_percent_ops_off": statistics.median(off),
            "agent_cpu_percent_ops_on": statistics.median(on),
            "agent_cpu_runs_off": off,
            "agent_cpu_runs_on": on,
        })  # fmt: skip
        print(
            f"agent CPU at 4 ranks, % of a core: metrics+alerts off {statistics.median(off):.2f} "
            f"({', '.join(f'{v:.2f}' for v in off)}), on (scraped every 1 s) {statistics.median(on):.2f} "
            f"({', '.join(f'{v:.2f}' for v in on)})"
        )
    if args.json:
        print(json.dumps(figures))


if __name__ == "__main__":
    main()
