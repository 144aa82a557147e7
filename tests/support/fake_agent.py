"""A stand-in agent: serves AgentService from hand-made or synthetic telemetry, with no training behind it.

For tests (``FakeAgent`` on a grpc.aio server in the test's own event loop), for deterministic screenshots
(``SyntheticNode`` with a seed and a fixed start time) and for trying the dashboard without torch:

    python -m support.fake_agent --nodes 2 --ranks-per-node 2
    megascope dashboard --agents 127.0.0.1:PORT1,127.0.0.1:PORT2

It follows the agent's Watch contract: back-fill batches (``backfill = true``) holding everything pushed so
far, then a live batch every ``interval`` seconds with whatever arrived since (possibly nothing); every batch
carries the node info and the rank statuses.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import grpc

from megascope.dashboard.model.cluster import ClusterModel
from megascope.protos.events import make_event
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2

GIB = 1024**3
_BUSY_SHARE = 0.95
"""Share of a synthetic step a rank spends on its own work when nobody is slow; the rest is communication."""


class FakeAgent(agent_pb2_grpc.AgentServiceServicer):
    """An AgentService whose telemetry is whatever the owner ``push``es."""

    def __init__(
        self,
        node_info: telemetry_pb2.NodeInfo,
        rank_statuses: Sequence[telemetry_pb2.RankStatus] = (),
        *,
        interval: float = 0.25,
    ) -> None:
        self.node_info = node_info
        self.rank_statuses = list(rank_statuses)
        self.interval = interval
        self.history: list[telemetry_pb2.Telemetry] = []
        self.watch_calls = 0
        self._changed = asyncio.Event()
        self.stacks: agent_pb2.DumpStacksResponse | None = None
        """DumpStacks' reply; None answers UNIMPLEMENTED."""
        self.restart_step = 40
        """The step Restart answers it resumes from."""
        self.refusal: tuple[grpc.StatusCode, str] | None = None
        """When set, control calls (DumpStacks, Restart) fail with this code and message."""
        self.control_calls: list[tuple[str, object, dict[str, str]]] = []
        """(method, request, metadata) of every control call, in order."""
        self.rank_logs: dict[int, list[telemetry_pb2.LogLine]] | None = {}
        """GetRankLog's lines per rank (``write_log`` adds); None answers UNIMPLEMENTED, as an agent older than the
        call does. A rank with no entry and not in ``node_info.ranks`` gets NOT_FOUND."""
        self.rank_log_calls: list[tuple[agent_pb2.GetRankLogRequest, dict[str, str]]] = []
        """(request, metadata) of every GetRankLog call, in order."""

    def push(self, telemetry: telemetry_pb2.Telemetry) -> None:
        """Make ``telemetry`` part of the node's history; live watchers get it with their next batch."""
        self.history.append(telemetry)
        for status in telemetry.rank_statuses:  # statuses in a pushed batch update the node's table
            self.set_status(status)
        self._changed.set()

    def set_status(self, status: telemetry_pb2.RankStatus) -> None:
        self.rank_statuses = [s for s in self.rank_statuses if s.rank != status.rank] + [status]
        self.rank_statuses.sort(key=lambda s: s.rank)

    def _stamped(self, batch: telemetry_pb2.Telemetry, backfill: bool) -> telemetry_pb2.Telemetry:
        out = telemetry_pb2.Telemetry()
        out.CopyFrom(batch)
        out.backfill = backfill
        out.node_info.CopyFrom(self.node_info)
        del out.rank_statuses[:]
        out.rank_statuses.extend(self.rank_statuses)
        return out

    async def Watch(  # noqa: N802 - the gRPC method name
        self, request: agent_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.WatchResponse]:
        self.watch_calls += 1
        sent = len(self.history)
        for batch in self.history[:sent]:
            yield agent_pb2.WatchResponse(telemetry=self._stamped(batch, backfill=True))
        while True:
            await asyncio.sleep(self.interval)
            merged = telemetry_pb2.Telemetry()
            for batch in self.history[sent:]:
                merged.MergeFrom(batch)
            sent = len(self.history)
            yield agent_pb2.WatchResponse(telemetry=self._stamped(merged, backfill=False))

    async def GetSnapshot(  # noqa: N802
        self, request: agent_pb2.GetSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetSnapshotResponse:
        latest: dict[int, telemetry_pb2.StepReport] = {}
        gpus: dict[int, telemetry_pb2.GpuSample] = {}
        reply = agent_pb2.GetSnapshotResponse(node_info=self.node_info, rank_statuses=self.rank_statuses)
        for batch in self.history:
            for report in batch.step_reports:
                latest[report.rank] = report
            for gpu in batch.gpu_samples:
                gpus[gpu.index] = gpu
            if batch.host_samples:
                reply.host_sample.CopyFrom(batch.host_samples[-1])
            reply.events.extend(batch.events)
        reply.step_reports.extend(latest[r] for r in sorted(latest))
        reply.gpu_samples.extend(gpus[i] for i in sorted(gpus))
        return reply

    async def GetEvents(  # noqa: N802
        self, request: agent_pb2.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetEventsResponse:
        events = [
            e
            for batch in self.history
            for e in batch.events
            if e.wall_time > request.since_wall_time and (not request.kinds or e.kind in request.kinds)
        ]
        if request.limit > 0:
            events = events[-request.limit :]
        return agent_pb2.GetEventsResponse(events=events)

    def write_log(self, rank: int, *texts: str, stream: int = telemetry_pb2.LOG_STREAM_STDOUT) -> None:
        """Rank ``rank`` wrote ``texts`` (numbered as the agent numbers them)."""
        assert self.rank_logs is not None, "this fake agent answers GetRankLog with UNIMPLEMENTED"
        lines = self.rank_logs.setdefault(rank, [])
        for text in texts:
            lines.append(telemetry_pb2.LogLine(text=text, stream=stream, seq=len(lines) + 1))  # type: ignore[arg-type]

    async def GetRankLog(  # noqa: N802
        self, request: agent_pb2.GetRankLogRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetRankLogResponse:
        self.rank_log_calls.append((request, dict(context.invocation_metadata() or ())))
        if self.rank_logs is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            raise AssertionError("unreachable")
        if request.rank not in self.rank_logs and request.rank not in self.node_info.ranks:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"rank {request.rank} does not run on this fake node")
        lines = self.rank_logs.get(request.rank, [])
        kept = lines[-(request.max_lines or 200) :]
        return agent_pb2.GetRankLogResponse(rank=request.rank, lines=kept, lines_left_out=len(lines) - len(kept))

    async def _control(self, method: str, request: object, context: grpc.aio.ServicerContext) -> None:
        self.control_calls.append((method, request, dict(context.invocation_metadata() or ())))
        if self.refusal is not None:
            await context.abort(*self.refusal)

    async def DumpStacks(  # noqa: N802
        self, request: agent_pb2.DumpStacksRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.DumpStacksResponse:
        await self._control("DumpStacks", request, context)
        if self.stacks is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this fake agent was given no stacks")
        return self.stacks

    async def Restart(  # noqa: N802
        self, request: agent_pb2.RestartRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RestartResponse:
        await self._control("Restart", request, context)
        return agent_pb2.RestartResponse(
            ranks_stopped=len(self.node_info.ranks), step=request.step or self.restart_step
        )


def faulthandler_text(*main_frames: tuple[str, int, str]) -> str:
    """What ``faulthandler.dump_traceback(all_threads=True)`` prints for a rank: a telemetry thread waiting on its
    queue, then the main thread in ``main_frames`` (file, line, function; innermost first) under ``<module>``."""
    lines = [
        "Thread 0x00007f3a1c9ff640 (most recent call first):",
        '  File "/usr/lib/python3.11/threading.py", line 324 in wait',
        '  File "/usr/lib/python3.11/queue.py", line 180 in get',
        "",
        "Current thread 0x00007f3a2b1e4740 (most recent call first):",
    ]
    lines += [f'  File "{file}", line {line} in {function}' for file, line, function in main_frames]
    lines.append('  File "/work/megascope/engine/train.py", line 12 in <module>')
    return "\n".join(lines) + "\n"


async def serve(servicer: agent_pb2_grpc.AgentServiceServicer, port: int = 0) -> tuple[grpc.aio.Server, str]:
    """Start a grpc.aio server on 127.0.0.1 in the running loop; returns it and its ``host:port``."""
    server = grpc.aio.server()
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    return server, f"127.0.0.1:{bound}"


# ----------------------------------------------------------------------------------------------------------
# Synthetic training: plausible numbers for a small data-parallel run


@dataclass
class SyntheticNode:
    """One node of a pretend data-parallel job. Deterministic for a given seed and start time."""

    node: str
    ranks: list[int]
    world_size: int
    agent_address: str = ""
    gpus: int = 0
    start_wall_time: float = 1_767_225_600.0  # 2026-01-01 00:00 UTC
    total_steps: int = 400
    step_seconds: float = 0.31
    tokens_per_step: int = 4096
    slow_rank: int | None = None
    """A straggler: this rank's own work takes ``slow_factor`` times longer, and every other rank waits for it in
    the all-reduce (the same on every node, so each node knows how long the job's step is)."""
    slow_factor: float = 1.3
    checkpoint_every: int = 100
    seed: int = 0
    run_id: str = "demo"
    step: int = 0
    now: float = field(init=False)
    _last_host_sample: float = field(init=False)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.now = self.start_wall_time + 3.0  # time to start the workers
        self._last_host_sample = self.start_wall_time
        self._rng = random.Random(self.seed)

    def node_info(self) -> telemetry_pb2.NodeInfo:
        return telemetry_pb2.NodeInfo(
            node=self.node,
            hostname=f"{self.node}.cluster",
            agent_address=self.agent_address,
            pid=4000 + self.ranks[0],
            ranks=self.ranks,
            world_size=self.world_size,
            gpu_available=self.gpus > 0,
            gpu_status=f"{self.gpus} GPU" if self.gpus else "no GPU: NVML Shared Library Not Found",
            start_wall_time=self.start_wall_time,
            agent_version="0.1.0",
            total_steps=self.total_steps,
            run_id=self.run_id,
        )

    def rank_statuses(self, state: int = telemetry_pb2.RANK_STATE_RUNNING) -> list[telemetry_pb2.RankStatus]:
        return [
            telemetry_pb2.RankStatus(
                rank=r, pid=5000 + r, state=state, last_step=self.step, last_heartbeat_wall_time=self.now
            )
            for r in self.ranks
        ]

    def started(self) -> telemetry_pb2.Telemetry:
        """The batch an agent sends as its workers start: one event per rank."""
        batch = telemetry_pb2.Telemetry()
        for rank in self.ranks:
            batch.events.add(
                wall_time=self.start_wall_time + 1.0,
                node=self.node,
                kind="started",
                severity=telemetry_pb2.Event.SEVERITY_INFO,
                rank=rank,
                text=f"rank {rank} started (pid {5000 + rank})",
            )
        if not self.gpus:
            batch.events.add(
                wall_time=self.start_wall_time,
                node=self.node,
                kind="no_gpu",
                severity=telemetry_pb2.Event.SEVERITY_WARNING,
                text="no GPU: NVML Shared Library Not Found",
            )
        return batch

    def advance(self, steps: int) -> telemetry_pb2.Telemetry:
        """Run ``steps`` more steps; the batch holds their reports, host/GPU samples and events."""
        batch = telemetry_pb2.Telemetry()
        for _ in range(steps):
            if self.total_steps and self.step >= self.total_steps:
                break
            self.step += 1
            busy = {r: self._busy_time(r) for r in self.ranks}
            step_seconds = self._job_step_seconds()
            self.now += step_seconds
            for rank in self.ranks:
                batch.step_reports.append(self._report(rank, busy[rank], step_seconds))
            while self.now - self._last_host_sample >= 1.0:
                self._last_host_sample += 1.0
                batch.host_samples.append(self._host_sample(self._last_host_sample))
                batch.gpu_samples.extend(self._gpu_sample(i, self._last_host_sample) for i in range(self.gpus))
            if self.checkpoint_every and self.step % self.checkpoint_every == 0 and self.ranks[0] == 0:
                # A line in the log only, with no CheckpointDetail: the dashboard tracks checkpoints from the
                # detail, and the snapshots drawn from this node were made without a checkpoint in the header.
                text = f"checkpoint step_{self.step} committed (412 MiB, 1.8 s in background)"
                event = make_event(text, kind="checkpoint", node=self.node, step=self.step, wall_time=self.now)
                batch.events.append(event)
        return batch

    def _busy_time(self, rank: int) -> float:
        """The rank's own work this step (everything but waiting for the others)."""
        jitter = 1.0 + self._rng.uniform(-0.02, 0.02)
        slow = self.slow_factor if rank == self.slow_rank else 1.0
        return _BUSY_SHARE * self.step_seconds * jitter * slow

    def _job_step_seconds(self) -> float:
        """Every rank's step: the slowest rank's work at its worst jitter, plus the exposed communication.

        Deterministic, so every node of one job agrees on it without talking to the others.
        """
        slowest = self.slow_factor if self.slow_rank is not None else 1.0
        return _BUSY_SHARE * self.step_seconds * 1.02 * slowest + (1.0 - _BUSY_SHARE) * self.step_seconds

    def _report(self, rank: int, busy: float, seconds: float) -> telemetry_pb2.StepReport:
        rng = self._rng
        loss = 2.55 + 3.1 * math.exp(-self.step / 70.0) + rng.gauss(0.0, 0.025)
        data = busy * rng.uniform(0.003, 0.012)
        forward = busy * 0.33
        backward = busy * 0.55
        optimizer = busy * 0.08
        other = max(0.0, busy - data - forward - backward - optimizer)
        comm = seconds - busy  # blocked in the all-reduce until the slowest rank is done
        flops = 6.0 * 0.9e6 * self.tokens_per_step
        return telemetry_pb2.StepReport(
            node=self.node,
            rank=rank,
            local_rank=self.ranks.index(rank),
            world_size=self.world_size,
            step=self.step,
            loss=loss,
            lr=3e-3,
            grad_norm=0.8 + rng.uniform(-0.1, 0.1),
            tokens=self.tokens_per_step,
            step_seconds=seconds,
            data_wait_seconds=data,
            forward_seconds=forward,
            backward_seconds=backward,
            comm_wait_seconds=comm,
            optimizer_seconds=optimizer,
            other_seconds=other,
            tokens_per_second=self.tokens_per_step / seconds,
            mfu=0.244 * self.step_seconds / seconds,
            model_flops=flops,
            wall_time=self.now,
            collectives_issued=self.step * 4,
        )

    def _host_sample(self, wall_time: float) -> telemetry_pb2.HostSample:
        rng = self._rng
        writing = self.checkpoint_every and self.step % self.checkpoint_every < 3
        return telemetry_pb2.HostSample(
            node=self.node,
            wall_time=wall_time,
            cpu_percent=min(100.0, 82.0 + rng.uniform(-6.0, 9.0)),
            memory_used_bytes=int((6.2 + 0.002 * self.step) * GIB),
            memory_total_bytes=24 * GIB,
            disk_read_bytes_per_second=rng.uniform(0, 256 * 1024),
            disk_write_bytes_per_second=(220e6 if writing else 0.0) + rng.uniform(0, 64 * 1024),
            net_recv_bytes_per_second=38e6 + rng.uniform(-2e6, 2e6),
            net_sent_bytes_per_second=38e6 + rng.uniform(-2e6, 2e6),
            load_average_1m=1.9,
        )

    def _gpu_sample(self, index: int, wall_time: float) -> telemetry_pb2.GpuSample:
        rng = self._rng
        return telemetry_pb2.GpuSample(
            node=self.node,
            wall_time=wall_time,
            index=index,
            name="NVIDIA H100 80GB HBM3",
            uuid=f"GPU-{self.node}-{index}",
            utilization_percent=min(100.0, 93.0 + rng.uniform(-5.0, 5.0)),
            memory_used_bytes=int(61.5 * GIB),
            memory_total_bytes=80 * GIB,
            temperature_celsius=66.0 + rng.uniform(-2.0, 3.0),
            power_watts=540.0 + rng.uniform(-30.0, 30.0),
            power_limit_watts=700.0,
            sm_clock_mhz=1980,
            mem_clock_mhz=2619,
        )


def synthetic_model(
    *,
    nodes: int = 2,
    ranks_per_node: int = 2,
    steps: int = 250,
    total_steps: int = 400,
    gpus: int = 0,
    unreachable: Sequence[str] = (),
) -> ClusterModel:
    """A ClusterModel filled from ``nodes`` synthetic nodes, its clock frozen just after the last step.

    Deterministic (fixed seeds and start time): snapshot tests and screenshots draw it. The last rank is a
    straggler; every agent in ``unreachable`` is listed but never answered.
    """
    world = nodes * ranks_per_node
    sims = [
        SyntheticNode(
            node=f"node{n}",
            ranks=list(range(n * ranks_per_node, (n + 1) * ranks_per_node)),
            world_size=world,
            agent_address=f"10.0.0.{n + 1}:50051",
            gpus=gpus,
            total_steps=total_steps,
            slow_rank=world - 1 if world > 1 else None,
            seed=n,
        )
        for n in range(nodes)
    ]
    now = [sims[0].start_wall_time + 2.0]
    model = ClusterModel(clock=lambda: now[0])
    for address in unreachable:
        model.add_agent(address)
        model.set_disconnected(address, "UNAVAILABLE: failed to connect to all addresses")
    for sim in sims:
        model.add_agent(sim.agent_address)
        first = sim.started()
        first.node_info.CopyFrom(sim.node_info())
        model.ingest(sim.agent_address, first)
        model.set_connected(sim.agent_address)
    batches = []
    for sim in sims:
        batch = sim.advance(steps)
        batch.node_info.CopyFrom(sim.node_info())
        batch.rank_statuses.extend(sim.rank_statuses())
        batches.append((sim.agent_address, batch))
    # The batches arrive as their last steps are done: the ranks are seen stepping just now, not stalled.
    now[0] = max(sim.now for sim in sims) + 0.2
    for address, batch in batches:
        model.ingest(address, batch)
    return model


async def run_synthetic(agent: FakeAgent, node: SyntheticNode) -> None:
    """Play ``node`` in real time (its clock must start now): push each step when its wall time comes."""
    agent.node_info = node.node_info()
    agent.push(node.started())
    while not node.total_steps or node.step < node.total_steps:
        batch = node.advance(1)
        await asyncio.sleep(max(0.0, node.now - time.time()))
        agent.push(batch)
        for status in node.rank_statuses():
            agent.set_status(status)
    for status in node.rank_statuses(telemetry_pb2.RANK_STATE_EXITED):
        agent.set_status(status)


async def _main(nodes: int, ranks_per_node: int, steps: int, step_seconds: float, gpus: int) -> None:
    world = nodes * ranks_per_node
    servers, tasks = [], []
    for n in range(nodes):
        ranks = list(range(n * ranks_per_node, (n + 1) * ranks_per_node))
        node = SyntheticNode(
            node=f"node{n}",
            ranks=ranks,
            world_size=world,
            gpus=gpus,
            total_steps=steps,
            step_seconds=step_seconds,
            slow_rank=world - 1 if world > 1 else None,
            seed=n,
            start_wall_time=time.time(),
        )
        agent = FakeAgent(node.node_info(), node.rank_statuses(telemetry_pb2.RANK_STATE_STARTING))
        server, address = await serve(agent)
        node.agent_address = address
        servers.append(server)
        tasks.append(asyncio.create_task(run_synthetic(agent, node)))
        print(f"fake agent {node.node}: listening on {address}", flush=True)
    try:
        await asyncio.gather(*(s.wait_for_termination() for s in servers))
    finally:
        for task in tasks:
            task.cancel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m support.fake_agent", description=__doc__)
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--ranks-per-node", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--step-seconds", type=float, default=0.3)
    parser.add_argument("--gpus", type=int, default=0, help="pretend GPUs per node (0: report 'no GPU')")
    args = parser.parse_args(argv)
    try:
        asyncio.run(_main(args.nodes, args.ranks_per_node, args.steps, args.step_seconds, args.gpus))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
