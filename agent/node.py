"""One node's agent: the gRPC server, the samplers, and the torchrun process that runs the ranks."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

from megascope.agent.collectors import GpuSampler, HostSampler
from megascope.agent.merges import MergeRunner
from megascope.agent.server import AgentServer
from megascope.agent.state import HistoryLimits, NodeState
from megascope.agent.supervision import Supervisor
from megascope.engine.runtime import launch as launcher
from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV
from megascope.protos.megascope.v1 import telemetry_pb2

_SAMPLE_SECONDS = 1.0
_WARNING = telemetry_pb2.Event.SEVERITY_WARNING
_ERROR = telemetry_pb2.Event.SEVERITY_ERROR


@dataclass(frozen=True)
class AgentOptions:
    host: str = "127.0.0.1"
    port: int = 0
    node: str = ""
    history_seconds: float = 3600.0
    exit_when_done: bool = False
    launch: launcher.LaunchOptions | None = None
    """How to launch this node's ranks; None serves only (ranks are started elsewhere)."""
    entry: Sequence[str] = ()
    """torchrun's entry point: ``-m module args`` or ``script.py args``."""
    run_dir: str = "runs/agent"
    total_steps: int = 0
    token: str | None = None
    """Required from callers of control RPCs when set."""
    ckpt_dir: str | None = None
    """The run's checkpoint directory (listed and merged through the agent); None when it saves none."""
    hang_timeout: float | None = None
    """Seconds without a completed step before the ranks count as hung; None: max(30 s, 5 median steps)."""
    evict_slow_nodes: bool = False
    """Leave the job when this node's self-check finds it far slower than the others."""


class Agent:
    def __init__(self, options: AgentOptions) -> None:
        self.options = options
        node = options.node or socket.gethostname()
        self.gpus = GpuSampler(node)
        info = telemetry_pb2.NodeInfo(
            node=node,
            hostname=socket.gethostname(),
            pid=os.getpid(),
            gpu_available=self.gpus.available,
            gpu_status=self.gpus.status,
            start_wall_time=time.time(),
            agent_version=version("megascope"),
            total_steps=options.total_steps,
            run_id=options.launch.rdzv_id or "" if options.launch else "",
        )
        self.state = NodeState(info, HistoryLimits(seconds=options.history_seconds))
        self.merges = MergeRunner(self.state, options.ckpt_dir)
        self.supervisor = Supervisor(
            self.state, options.hang_timeout, evict=self._evict if options.evict_slow_nodes else None
        )
        self._evicted = False
        self.host = HostSampler(node)
        self._process: subprocess.Popen[bytes] | None = None
        self._stop = asyncio.Event()
        self.exit_code = 0

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        server = AgentServer(
            self.state, self.options.host, self.options.port, self.options.token, self.merges, self.supervisor,
            run_dir=self.options.run_dir, ckpt_dir=self.options.ckpt_dir,
        )  # fmt: skip
        self.state.node_info.agent_address = server.address
        await server.start()
        print(f"megascope agent: listening on {server.address}", flush=True)
        if not self.gpus.available:
            self.state.event("no_gpu", self.gpus.status, _WARNING)
        self.state.event("agent_started", f"agent for node {self.state.node_info.node} on {server.address}")

        self.supervisor.start()
        sampler = asyncio.ensure_future(self._sample_forever())
        supervisor = asyncio.ensure_future(self._supervise(server.address))
        try:
            await self._stop.wait()
        finally:
            self.state.event("agent_stopping", "agent shutting down")
            sampler.cancel()
            supervisor.cancel()
            await self.merges.close()
            await self.supervisor.stop()
            await self._stop_ranks()
            await server.stop()
            self.gpus.close()
        return self.exit_code

    async def _sample_forever(self) -> None:
        while True:
            start = time.monotonic()
            # psutil and NVML calls block briefly; keep them off the loop that serves the streams.
            host, gpus = await asyncio.to_thread(lambda: (self.host.sample(), self.gpus.sample()))
            self.state.add_host_sample(host)
            if gpus:
                self.state.add_gpu_samples(gpus)
            await asyncio.sleep(max(0.0, _SAMPLE_SECONDS - (time.monotonic() - start)))

    async def _supervise(self, address: str) -> None:
        options = self.options
        if options.launch is None:
            return
        env = {AGENT_ADDRESS_ENV: address, "MEGASCOPE_NODE": self.state.node_info.node}
        # Its own process group, so that stopping the agent stops torchrun and every rank with it.
        self._process = launcher.start(
            options.launch,
            options.entry,
            Path(options.run_dir) / "logs" / self.state.node_info.node,
            env,
            new_session=True,
        )
        self.state.event(
            "job_started",
            f"torchrun (pid {self._process.pid}) launching "
            f"{options.launch.nproc_per_node} rank(s): {' '.join(options.entry)}",
        )
        code = await asyncio.to_thread(self._process.wait)
        if code == 0:
            self.state.event("job_finished", "all ranks on this node finished")
        elif self._evicted:
            self.state.event("node_left", "this node left the job (evicted as slow); the other nodes go on", _WARNING)
        elif not self._stop.is_set():
            restarts = options.launch.max_restarts
            self.state.event(
                "job_failed",
                f"the job gave up: torch elastic exited with code {code} after {self.supervisor.restarts} restart(s) "
                f"of the {restarts} allowed (--max-restarts {restarts}); the last fault is above; logs under "
                f"{options.run_dir}/logs",
                _ERROR,
                restarts=str(self.supervisor.restarts),
                max_restarts=str(restarts),
            )
            self.exit_code = 1
        if options.exit_when_done:
            await asyncio.sleep(0.5)  # let watchers receive the last reports and the job event
            self._stop.set()

    def _evict(self, reason: str) -> None:
        """Leave the job: stop torchrun and its ranks; the other nodes' rendezvous goes on without this one."""
        if self._evicted or self._process is None:
            return
        self._evicted = True
        self.state.event("node_evicted", f"evicting this node from the job: {reason}", _WARNING)
        asyncio.ensure_future(self._stop_ranks())

    async def _stop_ranks(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            await asyncio.to_thread(launcher.stop, process)
