"""A real ``megascope agent`` for the Prometheus and alert tests, and a webhook receiver on a real HTTP server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from megascope.agent.state import NodeState
from megascope.protos.megascope.v1 import telemetry_pb2 as pb
from megascope.protos.megascope.v1 import worker_pb2
from support import REPO


@dataclass
class RunningAgent:
    process: subprocess.Popen[str]
    address: str
    metrics_url: str | None
    lines: list[str]


@contextmanager
def running_agent(run_dir: Path, *flags: str, node: str = "node0") -> Iterator[RunningAgent]:
    """``megascope agent --port 0 FLAGS`` with its stdout read on a thread; SIGTERM (then kill) on exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--node", node,
         "--run-dir", str(run_dir), "--batch-tokens", "256", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO,
    )  # fmt: skip
    assert process.stdout is not None
    lines: list[str] = []
    address, metrics_url = "", None
    for line in process.stdout:
        lines.append(line)
        if "listening on" in line:
            address = line.split()[-1]
        if "metrics on" in line:
            metrics_url = line.split()[-1]
        if "alerts to" in line or (metrics_url and "--alert-webhook" not in flags):
            break
        if "error" in line:
            break
    threading.Thread(target=lambda: lines.extend(process.stdout or ()), daemon=True).start()
    try:
        yield RunningAgent(process, address, metrics_url, lines)
    finally:
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


@dataclass
class Webhook:
    """What a webhook receiver got, and what it answers: ``statuses`` first (500s), then 200."""

    url: str = ""
    received: list[dict[str, Any]] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def bodies(self, kind: str) -> list[dict[str, Any]]:
        with self.lock:
            return [body for body in self.received if body.get("kind") == kind]


@contextmanager
def webhook_receiver(*statuses: int) -> Iterator[Webhook]:
    hook = Webhook(statuses=list(statuses))

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 (http.server's name)
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with hook.lock:
                hook.received.append(body)
                status = hook.statuses.pop(0) if hook.statuses else 200
            self.send_response(status)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}/services/SECRET-PATH"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()


def node_at_step_7() -> NodeState:
    """Two ranks at step 7 on GPUs 1 and 0, a host and two GPU samples, a crash, a restart, a save and a failed one."""
    state = NodeState(pb.NodeInfo(node="node0", agent_version="0.1.0"))
    for rank in (0, 1):
        state.rank_attached(worker_pb2.Hello(rank=rank, pid=100 + rank, world_size=2))
        state.event("started", pb.RunDetail(phase=pb.RunDetail.PHASE_STARTED, device=f"cuda:{1 - rank}"), rank=rank)
        for step in (6, 7):
            state.add_step(
                pb.StepReport(
                    node="node0", rank=rank, step=step, loss=3.0 - step / 10 - rank, step_seconds=0.5 + rank,
                    forward_seconds=0.1, comm_wait_seconds=0.2 * rank, tokens_per_second=1000.0, mfu=0.4,
                )
            )  # fmt: skip
    state.add_host_sample(pb.HostSample(node="node0", cpu_percent=12.5, memory_used_bytes=1 << 30))
    state.add_gpu_samples(
        [pb.GpuSample(node="node0", index=i, temperature_celsius=60 + i, throttle_reasons=["hw"] * i) for i in (0, 1)]
    )
    state.event("crash", pb.CrashDetail(exit_code=1), rank=1, step=7)
    state.event("restart", pb.RestartDetail(phase=pb.RestartDetail.PHASE_DONE, mttr_seconds=4.0, steps_lost=3))
    state.event("saved", pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_SAVED, step=6, total_seconds=1.5))
    state.event("failed", pb.CheckpointDetail(phase=pb.CheckpointDetail.PHASE_FAILED, step=7))
    return state
