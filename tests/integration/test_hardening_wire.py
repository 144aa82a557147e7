"""Issue 17, the worker channel and the wire, against a real agent on real sockets: each finding of the probe
(bench/probe/wire.py) with the probe's inputs. The ranks here are this test's own child processes (so, to the
in-process agent, its descendants, as torchrun's ranks are); the pure logic is in tests/unit/test_wire_checks.py.
"""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from support.agents import attach, wait_until, worker_metadata

from megascope.agent.merges import MergeRunner
from megascope.agent.processes import is_descendant
from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.agent.supervision import Supervisor
from megascope.agent.validation import MAX_TEXT_BYTES, Launched
from megascope.engine.runtime.agent_link import secret_metadata
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2, worker_pb2, worker_pb2_grpc

WORLD = 2
HANG_TIMEOUT = 5.0
"""Long enough that no test but the one about hangs sees one (before a first step it is three times as long)."""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Two processes that stand for the ranks this agent launched (its descendants)."""
    processes = [subprocess.Popen(["sleep", "300"]) for _ in range(WORLD)]
    yield processes
    for process in processes:
        process.kill()
        process.wait()


@pytest.fixture
def stranger() -> Iterator[int]:
    """A live process that is not the agent's: a sleep whose parent exits at once (it is re-parented)."""
    out = subprocess.run(["sh", "-c", "sleep 300 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True)
    pid = int(out.stdout)
    assert not is_descendant(pid) and psutil.pid_exists(pid)
    yield pid
    os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[AgentServer]:
    state = NodeState(telemetry_pb2.NodeInfo(node="node0"))
    supervisor = Supervisor(state, hang_timeout=HANG_TIMEOUT)
    launched = Launched(
        started=time.time(), world_sizes=(WORLD, WORLD), local_world_size=WORLD, owns_pid=is_descendant,
        running=is_descendant,
    )  # fmt: skip
    (tmp_path / "ckpt").mkdir()
    server = AgentServer(
        state, "127.0.0.1", 0, supervisor=supervisor, ckpt_dir=str(tmp_path / "ckpt"), launched=launched,
        merges=MergeRunner(state, tmp_path / "ckpt"),
    )  # fmt: skip
    await server.start()
    supervisor.start()
    yield server
    await supervisor.stop()
    await server.stop(grace_seconds=0.5)


def hello(rank: int, pid: int, world_size: int = WORLD) -> worker_pb2.AttachRequest:
    return worker_pb2.AttachRequest(
        hello=worker_pb2.Hello(rank=rank, local_rank=rank % WORLD, world_size=world_size, pid=pid, node="node0")
    )


async def open_rank(agent: AgentServer, rank: int, pid: int) -> tuple[grpc.aio.Channel, grpc.aio.StreamStreamCall]:
    """A rank's Attach stream, open and acknowledged."""
    channel = grpc.aio.insecure_channel(agent.worker_address)
    call = worker_pb2_grpc.WorkerServiceStub(channel).Attach(metadata=worker_metadata(agent))
    await call.write(hello(rank, pid))
    response = await call.read()
    assert response.HasField("ack")
    return channel, call


def code_of(error: BaseException | None) -> grpc.StatusCode | None:
    return error.code() if isinstance(error, grpc.aio.AioRpcError) else None


async def report_exit(agent: AgentServer, report: worker_pb2.ExitReport, metadata: object = None) -> object:
    async with grpc.aio.insecure_channel(agent.worker_address) as channel:
        try:
            return await worker_pb2_grpc.WorkerServiceStub(channel).ReportExit(
                worker_pb2.ReportExitRequest(report=report),
                metadata=worker_metadata(agent) if metadata is None else metadata,
            )
        except grpc.aio.AioRpcError as error:
            return error


# --- the channel ------------------------------------------------------------------------------------------------


async def test_worker_calls_reach_only_the_private_socket_and_only_with_the_jobs_secret(agent: AgentServer) -> None:
    async with grpc.aio.insecure_channel(agent.address) as public:
        stub = worker_pb2_grpc.WorkerServiceStub(public)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.Attach(iter([hello(0, 0, world_size=1)])):
                pass
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ReportExit(worker_pb2.ReportExitRequest(report=worker_pb2.ExitReport(wall_time=4e9)))
        assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert agent.worker_address.startswith("unix:")
    assert stat.S_IMODE(os.stat(agent.worker_socket).st_mode) == 0o600

    spoof = hello(0, 0, world_size=1)
    assert code_of(await attach(agent, spoof, metadata=())) == grpc.StatusCode.UNAUTHENTICATED
    assert code_of(await attach(agent, spoof, metadata=secret_metadata("guess"))) == grpc.StatusCode.PERMISSION_DENIED
    forged = worker_pb2.ExitReport(rank=0, exit_code=1, wall_time=4e9)
    assert code_of(await report_exit(agent, forged, metadata=())) == grpc.StatusCode.UNAUTHENTICATED
    assert not agent.state.ranks and not agent.state.events
    assert agent.control.attached_ranks == []


# --- what a rank claims -----------------------------------------------------------------------------------------


async def test_spoofed_hellos_and_a_stray_heartbeat_are_refused_and_change_nothing(
    agent: AgentServer, children: list[subprocess.Popen[bytes]]
) -> None:
    channel, rank0 = await open_rank(agent, 0, children[0].pid)
    try:
        for spoof, names in [
            (hello(0, 0, world_size=1), "hello.world_size: 1"),
            (hello(90, children[1].pid, world_size=91), "hello.world_size: 91"),
            (hello(1, 0), "hello.pid: 0"),
        ]:
            error = await attach(agent, spoof)
            assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT and names in (error.details() or "")  # type: ignore[union-attr]
        stray = worker_pb2.AttachRequest(heartbeat=telemetry_pb2.Heartbeat(rank=-7, wall_time=time.time()))
        error = await attach(agent, hello(1, children[1].pid), stray)
        assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT and "heartbeat.rank: -7" in error.details()  # type: ignore[union-attr, operator]
        await wait_until(lambda: 1 not in agent.control.attached_ranks)
        assert set(agent.state.ranks) <= {0, 1} and agent.state.node_info.world_size == WORLD
        assert agent.state.ranks[0].pid == children[0].pid
        assert agent.state.ranks[0].state == telemetry_pb2.RANK_STATE_STARTING
        assert not [e for e in agent.state.events if e.kind == "restart" or (e.HasField("rank") and e.rank == 0)]
        async with grpc.aio.insecure_channel(agent.address) as public:
            stacks = await agent_pb2_grpc.AgentServiceStub(public).DumpStacks(agent_pb2.DumpStacksRequest())
        assert [(r.rank, r.pid) for r in stacks.ranks] == [(0, children[0].pid)]
    finally:
        rank0.cancel()
        await channel.close()


async def test_a_forged_exit_report_opens_no_incident_and_hangs_are_still_detected(
    agent: AgentServer, children: list[subprocess.Popen[bytes]]
) -> None:
    channel, rank0 = await open_rank(agent, 0, children[0].pid)
    try:
        await rank0.write(worker_pb2.AttachRequest(step_report=telemetry_pb2.StepReport(rank=0, step=1)))
        await wait_until(lambda: agent.state.ranks[0].HasField("last_step"))
        pid = children[0].pid
        future = await report_exit(agent, worker_pb2.ExitReport(rank=0, pid=pid, exit_code=1, wall_time=4e9))
        assert code_of(future) == grpc.StatusCode.INVALID_ARGUMENT and "in the future" in future.details()  # type: ignore[union-attr, operator]
        alive = await report_exit(agent, worker_pb2.ExitReport(rank=0, pid=pid, exit_code=1, wall_time=time.time()))
        assert code_of(alive) == grpc.StatusCode.INVALID_ARGUMENT and "still running" in alive.details()  # type: ignore[union-attr, operator]
        outside = await report_exit(agent, worker_pb2.ExitReport(rank=7, pid=9, exit_code=1, wall_time=time.time()))
        assert code_of(outside) == grpc.StatusCode.INVALID_ARGUMENT
        # Another process than rank 0's live one: accepted (it may be a rank that died before its Hello), ignored.
        other = worker_pb2.ExitReport(rank=0, pid=2**22 + 17, exit_code=1, wall_time=time.time())
        assert isinstance(await report_exit(agent, other), worker_pb2.ReportExitResponse)
        await asyncio.sleep(1.5)  # past the wait for a guard's report: a crash would be named by now
        assert agent.control.attached_ranks == [0]
        assert not [e for e in agent.state.events if e.kind == "crash"]
        assert agent.state.ranks[0].state == telemetry_pb2.RANK_STATE_RUNNING
        # No step for the hang timeout: hang detection is on, and it acts.
        await wait_until(lambda: any(e.kind in ("hang", "stalled") for e in agent.state.events), timeout=60)
    finally:
        rank0.cancel()
        await channel.close()


async def test_a_hello_naming_another_process_is_refused_and_no_such_process_is_ever_signalled(
    agent: AgentServer, stranger: int
) -> None:
    for pid in (stranger, os.getpid(), os.getppid(), 1):
        error = await attach(agent, hello(0, pid))
        assert code_of(error) == grpc.StatusCode.INVALID_ARGUMENT and f"hello.pid: {pid}" in error.details()  # type: ignore[union-attr, operator]
    # A pid the agent did record, that has since changed hands (here: written in directly), is not signalled either.
    agent.state.stack_files[0] = "/dev/null"
    agent.state.ranks[0] = telemetry_pb2.RankStatus(rank=0, pid=stranger, state=telemetry_pb2.RANK_STATE_RUNNING)
    async with grpc.aio.insecure_channel(agent.address) as public:
        stacks = await agent_pb2_grpc.AgentServiceStub(public).DumpStacks(agent_pb2.DumpStacksRequest())
    assert [(r.rank, r.answered, r.method) for r in stacks.ranks] == [(0, False, "not a process of this agent")]
    assert agent.control._supervisor.stop_ranks("for the hang") == 0  # SIGKILL to descendants only
    await asyncio.sleep(0.5)
    assert psutil.Process(stranger).status() != psutil.STATUS_ZOMBIE  # raises NoSuchProcess had it been killed


# --- sizes ------------------------------------------------------------------------------------------------------


async def test_seventy_one_megabyte_events_leave_the_agent_small_and_every_answer_readable(
    agent: AgentServer, children: list[subprocess.Popen[bytes]]
) -> None:
    channel, rank0 = await open_rank(agent, 0, children[0].pid)
    try:
        before = agent.state.history_bytes
        for i in range(70):
            event = telemetry_pb2.Event(kind="spam", text=f"{i} " + "x" * 1_000_000, wall_time=time.time())
            await rank0.write(worker_pb2.AttachRequest(event=event))
        await wait_until(lambda: sum(e.kind == "spam" for e in agent.state.events) == 70, timeout=60)
    finally:
        rank0.cancel()
        await channel.close()
    assert agent.state.history_bytes - before < 70 * (MAX_TEXT_BYTES + 200)
    spam = [e for e in agent.state.events if e.kind == "spam"]
    assert all(len(e.text.encode()) <= MAX_TEXT_BYTES and e.text.endswith("bytes trimmed]") for e in spam)
    too_big = worker_pb2.AttachRequest(event=telemetry_pb2.Event(kind="spam", text="y" * (2 << 20)))
    assert code_of(await attach(agent, hello(1, children[1].pid), too_big)) == grpc.StatusCode.RESOURCE_EXHAUSTED

    # History the agent itself recorded can be large too (60 KB each, 9 MB in all): answers are paged or trimmed.
    for i in range(150):
        agent.state.event(f"big {i} " + "z" * 60_000, kind="big")
    async with grpc.aio.insecure_channel(agent.address) as public:  # the client's default limit: 4 MiB
        stub = agent_pb2_grpc.AgentServiceStub(public)
        snapshot = await stub.GetSnapshot(agent_pb2.GetSnapshotRequest())
        assert snapshot.events and snapshot.events_left_out > 0 and snapshot.events[-1].text.startswith("big 149 ")
        events = await stub.GetEvents(agent_pb2.GetEventsRequest(kinds=["big"]))
        assert events.events_left_out + len(events.events) == 150 and events.events[-1].text.startswith("big 149 ")
        first = next(e for e in agent.state.events if e.kind == "big")
        paged: list[str] = []
        since = first.wall_time - 1e-3
        while True:  # paging forward from a time, as a client that wants them all does
            page = await stub.GetEvents(agent_pb2.GetEventsRequest(kinds=["big"], since_wall_time=since))
            paged += [e.text.split()[1] for e in page.events]
            if not page.events_left_out:
                break
            since = page.events[-1].wall_time
        assert paged == [str(i) for i in range(150)]
        seen: list[str] = []
        async with asyncio.timeout(30):
            async for response in stub.Watch(agent_pb2.WatchRequest()):
                seen += [e.text for e in response.telemetry.events if e.kind == "big"]
                if not response.telemetry.backfill:
                    break
        assert len(seen) == 150


async def test_a_merge_of_ten_thousand_steps_is_refused_at_once_and_the_client_sees_why(agent: AgentServer) -> None:
    async with grpc.aio.insecure_channel(agent.address) as public:
        stub = agent_pb2_grpc.AgentServiceStub(public)
        start = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            async for _ in stub.StartMerge(agent_pb2.StartMergeRequest(method="sma", steps=range(1, 10_001))):
                pass
        assert time.monotonic() - start < 10
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "steps: at most 1000" in (refused.value.details() or "")
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            async for _ in stub.StartMerge(agent_pb2.StartMergeRequest(method="sma", steps=range(10**9, 10**9 + 1000))):
                pass
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no committed checkpoint" in (missing.value.details() or "")
        assert len(missing.value.details() or "") <= 1000
