"""One node's agent: the gRPC server, the samplers, and the torchrun process that runs the ranks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING

from megascope.agent.auth import ServerTLS
from megascope.agent.collectors import GpuSampler, HostSampler
from megascope.agent.control import ControlError, JobControl
from megascope.agent.merges import MergeRunner
from megascope.agent.processes import is_descendant, is_own_user, launched_rank
from megascope.agent.record import Recorder
from megascope.agent.server import AgentServer
from megascope.agent.state import HistoryLimits, NodeState
from megascope.agent.stragglers import NodeStragglers
from megascope.agent.supervision import Supervisor
from megascope.agent.validation import Launched
from megascope.engine.runtime import launch as launcher
from megascope.engine.runtime import recovery_env
from megascope.engine.runtime import run_dir as run_paths
from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV, AGENT_SECRET_ENV
from megascope.protos import events
from megascope.protos.megascope.v1 import telemetry_pb2

if TYPE_CHECKING:  # loaded only when asked for: prometheus_client and the HTTP threads
    from megascope.agent.alerts import AlertService
    from megascope.agent.metrics import MetricsServer

DEFAULT_RUN_DIR = "runs/agent"
"""The run directory of a script launched with ``megascope agent -- script.py`` and no --run-dir."""
_SAMPLE_SECONDS = 1.0
STOP_GRACE_SECONDS = 8.0
"""On shutdown, how long ranks that accepted a STOP have to reach their step and exit before they are signalled."""
_Job = telemetry_pb2.JobDetail


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
    run_dir: str = DEFAULT_RUN_DIR
    total_steps: int = 0
    token: str | None = None
    """Required from callers of control RPCs when set."""
    token_reads: bool = False
    """The token is required from callers of the reading RPCs too (Watch, GetSnapshot, ...)."""
    tls: ServerTLS | None = None
    """Serve TLS (mutual TLS when it names a CA); None: plaintext."""
    ckpt_dir: str | None = None
    """The run's checkpoint directory (listed and merged through the agent); None when it saves none."""
    hang_timeout: float | None = None
    """Seconds without a completed step before the ranks count as hung; None: max(30 s, 5 median steps)."""
    evict_slow_nodes: bool = False
    """Leave the job when this node's self-check finds it far slower than the others."""
    metrics_host: str = "127.0.0.1"
    metrics_port: int | None = None
    """Serve Prometheus metrics on this port (0: a free one); None: no metrics page."""
    alert_webhooks: Sequence[str] = ()
    """URLs to POST an alert to on each incident this node reports."""


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
        # This node's ranks judged for stragglers as their steps arrive: events (so alerts) and /metrics.
        self.stragglers = NodeStragglers(self.state)
        self.state.step_observers.append(self.stragglers.add_step)
        self.merges = MergeRunner(self.state, options.ckpt_dir)
        launch = options.launch
        in_place = launch is not None and launcher.recovery_mode(launch, options.entry) == recovery_env.INPLACE
        self.supervisor = Supervisor(
            self.state,
            options.hang_timeout,
            evict=self._evict if options.evict_slow_nodes else None,
            # In place, a hang's culprit is stopped alone, and a whole-job stop goes through the ranks' guards.
            launcher=self._launcher_pid if in_place else None,
        )
        self.control = JobControl(self.state, self.supervisor, options.run_dir, options.ckpt_dir)
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
            self.state,
            self.options.host,
            self.options.port,
            self.options.token,
            self.merges,
            control=self.control,
            token_reads=self.options.token_reads,
            tls=self.options.tls,
            worker_socket=run_paths.worker_socket(self.options.run_dir, self.state.node_info.node),
            launched=self._launched(),
        )
        self.state.node_info.agent_address = server.address
        await server.start()
        print(f"megascope agent: listening on {server.address}", flush=True)
        if not self.gpus.available:
            self.state.event(self.gpus.status, kind=events.NO_GPU, severity=events.WARNING)
        self.state.event(f"agent for node {self.state.node_info.node} on {server.address}", kind=events.AGENT_STARTED)

        # The node's record (RUN_DIR/record/NODE.sqlite): appended to by an agent restarted on the same run directory.
        recorder = Recorder.open(self.state, self.options.run_dir)
        if recorder is not None:
            recorder.start()
            self.supervisor.on_stacks = recorder.add_stacks
            self.state.archive = recorder.archive
        self.supervisor.start()
        metrics, alerts = self._start_ops()
        sampler = asyncio.ensure_future(self._sample_forever())
        if self.options.launch is None:
            self._tell_outside_ranks(server)
        supervisor = asyncio.ensure_future(self._supervise(server.worker_address, server.worker_secret))
        try:
            await self._stop.wait()
        finally:
            self.state.event("agent shutting down", kind=events.AGENT_STOPPING)
            sampler.cancel()
            supervisor.cancel()
            await self.merges.close()
            await self.supervisor.stop()
            await self._stop_ranks(gracefully=True)
            await server.stop()
            if metrics is not None:
                await metrics.stop()
            if alerts is not None:
                await alerts.stop()
            if recorder is not None:
                await recorder.stop()
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

    def _start_ops(self) -> tuple[MetricsServer | None, AlertService | None]:
        """The Prometheus page and the alert webhooks, where asked for (each loads its library only then)."""
        options, metrics, alerts = self.options, None, None
        if options.metrics_port is not None:
            from megascope.agent.metrics import MetricsServer, NodeMetrics

            # The page asks for the token exactly when gRPC reads do (--token-reads).
            token = options.token if options.token_reads else None
            metrics = MetricsServer(
                NodeMetrics(self.state, self.merges.status, stragglers=self.stragglers),
                options.metrics_host, options.metrics_port, token=token, tls=options.tls,
            )  # fmt: skip
            metrics.start()
            print(f"megascope agent: metrics on {metrics.url}", flush=True)
        if options.alert_webhooks:
            from megascope.agent.alerts import AlertService, redact

            alerts = AlertService(self.state, options.alert_webhooks)
            alerts.start()
            print(f"megascope agent: alerts to {', '.join(redact(url) for url in options.alert_webhooks)}", flush=True)
        return metrics, alerts

    def _launched(self) -> Launched:
        """What this agent launches: what its ranks' Hellos, reports and pids are checked against."""
        launch, started = self.options.launch, self.state.node_info.start_wall_time
        if launch is None:  # --no-launch: ranks started elsewhere, by this agent's user
            return Launched(started=started, owns_pid=is_own_user, running=is_own_user)
        low, high = launch.node_range()
        trainer = list(self.options.entry[:2]) == ["-m", "megascope.engine.trainer"]
        return Launched(
            started=started,
            world_sizes=(low * launch.nproc_per_node, high * launch.nproc_per_node),
            local_world_size=launch.nproc_per_node,
            owns_pid=is_descendant,
            running=is_descendant,
            rank_of=launched_rank,
            # Our trainer keeps its stacks in the run directory; a script of the user's may keep them anywhere.
            stacks_dir=os.path.abspath(run_paths.stacks_file(self.options.run_dir, 0).parent) if trainer else None,
        )

    def _tell_outside_ranks(self, server: AgentServer) -> None:
        """With --no-launch, ranks started elsewhere need the worker channel and the secret: a file only this
        user can read."""
        path = run_paths.worker_info(self.options.run_dir, self.state.node_info.node)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({"address": server.worker_address, "secret": server.worker_secret}, file)
        print(
            f"megascope agent: ranks attach with {AGENT_ADDRESS_ENV} and {AGENT_SECRET_ENV} as given in {path}",
            flush=True,
        )

    async def _supervise(self, address: str, secret: str) -> None:
        options = self.options
        if options.launch is None:
            return
        # The worker channel and the job's secret: only the ranks launched here get them.
        env = {AGENT_ADDRESS_ENV: address, AGENT_SECRET_ENV: secret, "MEGASCOPE_NODE": self.state.node_info.node}
        # Its own process group, so that stopping the agent stops torchrun and every rank with it.
        self._process = launcher.start(
            options.launch,
            options.entry,
            run_paths.logs_dir(options.run_dir, self.state.node_info.node),
            env,
            new_session=True,
        )
        allowed = options.launch.max_restarts
        self.state.event(
            f"torchrun (pid {self._process.pid}) launching "
            f"{options.launch.nproc_per_node} rank(s): {' '.join(options.entry)}",
            _Job(phase=_Job.PHASE_STARTED, max_restarts=allowed),
        )
        code = await asyncio.to_thread(self._process.wait)
        restarts = self.supervisor.restarts
        if code == 0:
            self.state.event("all ranks on this node finished", _Job(phase=_Job.PHASE_FINISHED, restarts=restarts))
        elif self._evicted:
            self.state.event(
                "this node left the job (evicted as slow); the other nodes go on",
                _Job(phase=_Job.PHASE_NODE_LEFT, exit_code=code),
                severity=events.WARNING,
            )
        elif not self._stop.is_set():
            self.state.event(
                f"the job gave up: torch elastic exited with code {code} after {restarts} restart(s) "
                f"of the {allowed} allowed (--max-restarts {allowed}); the last fault is above; logs under "
                f"{run_paths.logs_dir(options.run_dir)}",
                _Job(phase=_Job.PHASE_FAILED, exit_code=code, restarts=restarts, max_restarts=allowed),
                severity=events.ERROR,
            )
            self.exit_code = 1
        if options.exit_when_done:
            await asyncio.sleep(0.5)  # let watchers receive the last reports and the job event
            self._stop.set()

    def _launcher_pid(self) -> int | None:
        """torchrun's pid while it runs."""
        process = self._process
        return process.pid if process is not None and process.poll() is None else None

    def _evict(self, reason: str) -> None:
        """Leave the job: stop torchrun and its ranks; the other nodes' rendezvous goes on without this one."""
        if self._evicted or self._process is None:
            return
        self._evicted = True
        self.state.event(
            f"evicting this node from the job: {reason}", _Job(phase=_Job.PHASE_NODE_EVICTED), severity=events.WARNING
        )
        asyncio.ensure_future(self._stop_ranks())

    async def _stop_ranks(self, gracefully: bool = False) -> None:
        """Stop torchrun and the ranks: signals (SIGTERM, then SIGKILL), after a clean STOP when ``gracefully``."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        if gracefully and await self._stop_cleanly(process):
            return
        await asyncio.to_thread(launcher.stop, process)

    async def _stop_cleanly(self, process: subprocess.Popen[bytes]) -> bool:
        """Ask the ranks to stop at a step boundary (Command STOP) and wait for torchrun to exit; whether it did.

        Only where this node runs the whole job: the agent picks the step every rank stops after, and it cannot
        pick one for another node's ranks (they would wait in a collective for ranks that left). Every rank must
        accept (a hung rank cannot answer), or the signals do the work.
        """
        launch = self.options.launch
        if launch is None or launch.node_range() != (1, 1) or not self.control.attached_ranks:
            return False
        try:
            sent = await self.control.stop()
        except ControlError:
            return False
        pending = self.control.command(sent.command_id)
        if pending is None or len(pending.acks) < sent.ranks:
            return False
        try:
            await asyncio.to_thread(process.wait, STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            return False
        return True
