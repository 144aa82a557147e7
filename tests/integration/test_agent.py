"""The agent's gRPC services on a real socket: back-fill and live telemetry, and bad input refused cleanly."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.agents import STAND_IN_RANKS, attach, serving_agent, wait_until, worker_metadata
from support.agents import worker_sink as sink_on
from support.wire import step_report

from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.agent.supervision import Supervisor
from megascope.engine.runtime.agent_link import AgentSink
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2, worker_pb2, worker_pb2_grpc


@pytest.fixture
async def agent() -> AsyncIterator[AgentServer]:
    async with serving_agent(telemetry_pb2.NodeInfo(node="node0", total_steps=100), STAND_IN_RANKS) as server:
        yield server


def worker_sink(agent: AgentServer, rank: int) -> AgentSink:
    """The engine's real sink, as a training rank uses it (its own thread, a sync gRPC stream)."""
    hello = worker_pb2.Hello(rank=rank, local_rank=rank, world_size=2, pid=1000 + rank, node="node0")
    return sink_on(agent, hello)


async def collect(address: str, until, timeout: float = 10.0) -> list[telemetry_pb2.Telemetry]:  # type: ignore[no-untyped-def]
    """Watch batches until ``until(batches)`` holds."""
    batches: list[telemetry_pb2.Telemetry] = []
    async with grpc.aio.insecure_channel(address) as channel:
        stream = agent_pb2_grpc.AgentServiceStub(channel).Watch(agent_pb2.WatchRequest())
        async with asyncio.timeout(timeout):
            async for response in stream:
                batches.append(response.telemetry)
                if until(batches):
                    stream.cancel()
                    return batches
    return batches


def steps_in(batches: list[telemetry_pb2.Telemetry], backfill: bool | None = None) -> set[tuple[int, int]]:
    return {(r.rank, r.step) for b in batches if backfill is None or b.backfill == backfill for r in b.step_reports}


async def test_watcher_gets_live_reports_and_a_late_watcher_gets_them_back_filled(agent: AgentServer) -> None:
    sinks = [worker_sink(agent, rank) for rank in (0, 1)]
    await wait_until(lambda: all(s.connected for s in sinks))
    early = asyncio.ensure_future(collect(agent.address, lambda b: len(steps_in(b)) >= 10))
    await asyncio.sleep(0.3)
    for step in range(1, 6):
        for rank, sink in enumerate(sinks):
            sink.write_step(step_report(rank, step))
    live = await early
    assert steps_in(live, backfill=False) == {(rank, step) for rank in (0, 1) for step in range(1, 6)}

    late = await collect(agent.address, lambda b: not b[-1].backfill)
    assert steps_in(late, backfill=True) == {(rank, step) for rank in (0, 1) for step in range(1, 6)}
    assert late[0].node_info.node == "node0" and late[0].node_info.total_steps == 100
    assert {s.rank: s.state for s in late[-1].rank_statuses} == {
        0: telemetry_pb2.RANK_STATE_RUNNING,
        1: telemetry_pb2.RANK_STATE_RUNNING,
    }
    for sink in sinks:
        await asyncio.to_thread(sink.close)  # the server runs on this loop: never block it


async def test_rank_that_finishes_is_exited_and_one_that_vanishes_is_failed(agent: AgentServer) -> None:
    finishing, vanishing = worker_sink(agent, 0), worker_sink(agent, 1)
    await wait_until(lambda: finishing.connected and vanishing.connected)
    finishing.write_step(step_report(0, 1))
    finishing.write_signal(worker_pb2.RankFinished(steps=1))
    await asyncio.to_thread(finishing.close)
    vanishing.write_step(step_report(1, 1))
    await wait_until(lambda: agent.state.ranks[1].HasField("last_step"))
    await asyncio.to_thread(vanishing.close, 0)  # the stream is cut without "finished", as when a rank dies
    await wait_until(lambda: agent.state.ranks[1].state == telemetry_pb2.RANK_STATE_FAILED)
    assert agent.state.ranks[0].state == telemetry_pb2.RANK_STATE_EXITED
    lost = [e for e in agent.state.events if e.kind == "rank_lost"]
    assert [e.rank for e in lost] == [1] and "pid 1001" in lost[0].text


async def test_health_service_reports_serving(agent: AgentServer) -> None:
    async with grpc.aio.insecure_channel(agent.address) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="megascope.v1.AgentService")
        )
    assert response.status == health_pb2.HealthCheckResponse.SERVING


HELLO = worker_pb2.AttachRequest(hello=worker_pb2.Hello(rank=0, world_size=2, pid=1, node="node0"))


@pytest.mark.parametrize(
    ("messages", "code", "names"),
    [
        ([worker_pb2.AttachRequest(step_report=telemetry_pb2.StepReport())], grpc.StatusCode.INVALID_ARGUMENT,
         "hello"),
        ([worker_pb2.AttachRequest(hello=worker_pb2.Hello(rank=5, world_size=2))], grpc.StatusCode.INVALID_ARGUMENT,
         "hello.rank"),
        ([HELLO, worker_pb2.AttachRequest(step_report=telemetry_pb2.StepReport(rank=0, step=1, step_seconds=-1))],
         grpc.StatusCode.INVALID_ARGUMENT, "step_report.step_seconds"),
        ([HELLO, worker_pb2.AttachRequest(step_report=telemetry_pb2.StepReport(rank=1, step=1))],
         grpc.StatusCode.INVALID_ARGUMENT, "step_report.rank"),
        ([HELLO, worker_pb2.AttachRequest(event=telemetry_pb2.Event(kind="x", severity=42))],  # type: ignore[arg-type]
         grpc.StatusCode.INVALID_ARGUMENT, "event.severity"),
        ([HELLO, worker_pb2.AttachRequest()], grpc.StatusCode.INVALID_ARGUMENT, "payload"),
        ([HELLO, worker_pb2.AttachRequest(event=telemetry_pb2.Event(kind="x", text="x" * (2 << 20)))],
         grpc.StatusCode.RESOURCE_EXHAUSTED, ""),
        ([HELLO, worker_pb2.AttachRequest(failure=worker_pb2.ExitReport(rank=1, exit_code=1))],
         grpc.StatusCode.INVALID_ARGUMENT, "failure.rank"),
        ([HELLO, worker_pb2.AttachRequest(finished=worker_pb2.RankFinished(steps=-1))],
         grpc.StatusCode.INVALID_ARGUMENT, "finished.steps"),
        ([HELLO, worker_pb2.AttachRequest(command_ack=worker_pb2.CommandAck(ok=True))],
         grpc.StatusCode.INVALID_ARGUMENT, "command_ack.command_id"),
        ([HELLO, worker_pb2.AttachRequest(self_check=worker_pb2.SelfCheckResult(
            detail=telemetry_pb2.SelfCheckDetail(verdict=42)))],  # type: ignore[arg-type]
         grpc.StatusCode.INVALID_ARGUMENT, "self_check.detail.verdict"),
    ],
    ids=["no-hello", "rank-out-of-range", "negative-time", "wrong-rank", "unknown-enum", "empty", "oversized",
         "failure-of-another-rank", "negative-finished-steps", "ack-without-id", "unknown-self-check-verdict"],
)  # fmt: skip
async def test_bad_worker_input_gets_a_clear_status_and_the_agent_keeps_serving(
    agent: AgentServer, messages: list[worker_pb2.AttachRequest], code: grpc.StatusCode, names: str
) -> None:
    error = await attach(agent, *messages)
    assert isinstance(error, grpc.aio.AioRpcError) and error.code() == code
    assert names in (error.details() or "")
    good = worker_sink(agent, 1)
    await wait_until(lambda: good.connected)
    good.write_step(step_report(1, 7))
    await wait_until(lambda: any(r.step == 7 for r in agent.state.step_reports))
    await asyncio.to_thread(good.close)


async def test_worker_that_disconnects_mid_stream_does_not_disturb_the_agent(agent: AgentServer) -> None:
    async with grpc.aio.insecure_channel(agent.worker_address) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Attach(metadata=worker_metadata(agent))
        await call.write(HELLO)
        await call.read()  # the Ack
        call.cancel()
    async with grpc.aio.insecure_channel(agent.address) as channel:
        snapshot = await agent_pb2_grpc.AgentServiceStub(channel).GetSnapshot(agent_pb2.GetSnapshotRequest())
    assert snapshot.node_info.node == "node0"
    await wait_until(lambda: agent.state.ranks[0].state == telemetry_pb2.RANK_STATE_FAILED)


async def test_watch_with_negative_backfill_is_invalid(agent: AgentServer) -> None:
    async with grpc.aio.insecure_channel(agent.address) as channel:
        stream = agent_pb2_grpc.AgentServiceStub(channel).Watch(agent_pb2.WatchRequest(backfill_seconds=-1))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in stream:
                pass
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "backfill_seconds" in (raised.value.details() or "")


async def test_get_events_filters_by_kind(agent: AgentServer) -> None:
    saved = telemetry_pb2.CheckpointDetail(phase=telemetry_pb2.CheckpointDetail.PHASE_SAVED, step=10)
    agent.state.event("saved step 10", saved)  # kind "checkpoint", from its detail
    agent.state.event("ignored", kind="other")
    async with grpc.aio.insecure_channel(agent.address) as channel:
        response = await agent_pb2_grpc.AgentServiceStub(channel).GetEvents(
            agent_pb2.GetEventsRequest(kinds=["checkpoint"])
        )
    assert [e.text for e in response.events] == ["saved step 10"]


# --- lifecycle messages and commands ------------------------------------------------------------------------


def request(**payload: object) -> worker_pb2.AttachRequest:
    return worker_pb2.AttachRequest(**payload)  # type: ignore[arg-type]


async def test_a_save_goes_down_each_rank_stream_as_a_command_and_a_refusing_ack_fails_the_call(
    agent: AgentServer,
) -> None:
    async with (
        grpc.aio.insecure_channel(agent.worker_address) as worker_channel,
        grpc.aio.insecure_channel(agent.address) as channel,
    ):
        worker = worker_pb2_grpc.WorkerServiceStub(worker_channel).Attach(metadata=worker_metadata(agent))
        await worker.write(HELLO)
        await worker.read()  # the Ack
        await worker.write(request(step_report=telemetry_pb2.StepReport(rank=0, step=10)))
        await wait_until(lambda: agent.state.ranks[0].HasField("last_step"))
        control = agent_pb2_grpc.AgentServiceStub(channel)

        save = asyncio.ensure_future(control.SaveCheckpoint(agent_pb2.SaveCheckpointRequest()))
        command = (await worker.read()).command
        assert command.kind == worker_pb2.COMMAND_KIND_CHECKPOINT and command.step == 13 and command.id
        await worker.write(request(command_ack=worker_pb2.CommandAck(command_id=command.id, ok=True)))
        assert await save == agent_pb2.SaveCheckpointResponse(step=13, ranks=1)
        [requested] = [e for e in agent.state.events if e.kind == "checkpoint_requested"]
        assert requested.checkpoint.step == 13

        save = asyncio.ensure_future(control.SaveCheckpoint(agent_pb2.SaveCheckpointRequest(step=20)))
        command = (await worker.read()).command
        assert command.step == 20
        refusal = worker_pb2.CommandAck(command_id=command.id, ok=False, message="this run saves no checkpoints")
        await worker.write(request(command_ack=refusal))
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await save
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "rank 0: this run saves no checkpoints" in (raised.value.details() or "")
        await worker.done_writing()


async def test_stop_goes_down_each_rank_stream_with_the_step_to_stop_after(agent: AgentServer) -> None:
    async with grpc.aio.insecure_channel(agent.worker_address) as channel:
        worker = worker_pb2_grpc.WorkerServiceStub(channel).Attach(metadata=worker_metadata(agent))
        await worker.write(HELLO)
        await worker.read()
        await worker.write(request(step_report=telemetry_pb2.StepReport(rank=0, step=4)))
        await wait_until(lambda: agent.state.ranks[0].HasField("last_step"))
        stop = asyncio.ensure_future(agent.control.stop())
        command = (await worker.read()).command
        assert command.kind == worker_pb2.COMMAND_KIND_STOP and command.step == 5
        await worker.write(request(command_ack=worker_pb2.CommandAck(command_id=command.id, ok=True, message="ok")))
        sent = await stop
        assert sent.step == 5 and sent.ranks == 1
        pending = agent.control.command(sent.command_id)
        assert pending is not None and pending.acks[0].message == "ok"
        await worker.done_writing()


async def test_a_ranks_failure_message_names_the_crash_with_its_exit_code_and_traceback() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="node0"))
    supervisor = Supervisor(state)
    server = AgentServer(state, "127.0.0.1", 0, supervisor=supervisor, launched=STAND_IN_RANKS)
    await server.start()
    supervisor.start()
    try:
        failure = worker_pb2.ExitReport(rank=0, exit_code=1, log_tail=["Traceback (most recent call last):",
                                                                         "RuntimeError: boom"])  # fmt: skip
        step = telemetry_pb2.StepReport(rank=0, step=3)
        assert await attach(server, HELLO, request(step_report=step), request(failure=failure)) is None
        await wait_until(lambda: any(e.kind == "crash" for e in state.events))
    finally:
        await supervisor.stop()
        await server.stop(grace_seconds=0.5)
    [crash] = [e for e in state.events if e.kind == "crash"]
    assert crash.rank == 0 and crash.step == 3 and "exited with code 1" in crash.text
    assert crash.crash.pid == 1 and list(crash.crash.log_tail)[-1] == "RuntimeError: boom"


async def test_a_slow_self_check_message_evicts_the_node_and_a_self_check_event_does_not() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="node0"))
    evicted: list[str] = []
    server = AgentServer(
        state, "127.0.0.1", 0, supervisor=Supervisor(state, evict=evicted.append), launched=STAND_IN_RANKS
    )
    await server.start()
    slow = telemetry_pb2.SelfCheckDetail(verdict=telemetry_pb2.SelfCheckDetail.VERDICT_SLOW,
                                         slow_measures=["matmul_gflops"])  # fmt: skip
    fine = telemetry_pb2.SelfCheckDetail(verdict=telemetry_pb2.SelfCheckDetail.VERDICT_OK)
    try:
        event = telemetry_pb2.Event(kind="self_check", text="node0: SLOW", self_check=slow)
        await attach(server, HELLO, request(event=event), request(self_check=worker_pb2.SelfCheckResult(
            detail=fine)))  # fmt: skip
        assert evicted == [] and [e.kind for e in state.events if e.kind != "rank_lost"] == ["self_check"]
        await attach(server, HELLO, request(self_check=worker_pb2.SelfCheckResult(detail=slow)))
        await wait_until(lambda: bool(evicted))
    finally:
        await server.stop(grace_seconds=0.5)
    assert "matmul_gflops" in evicted[0]


GARBAGE = b"\xff\xff\xff"


async def test_undecodable_request_bytes_get_invalid_argument_on_unary_and_streaming_methods(
    agent: AgentServer,
) -> None:
    async with (
        grpc.aio.insecure_channel(agent.address) as channel,
        grpc.aio.insecure_channel(agent.worker_address) as workers,
    ):
        calls = {
            "GetEventsRequest": lambda: channel.unary_unary("/megascope.v1.AgentService/GetEvents")(GARBAGE),
            "WatchRequest": lambda: _drain(channel.unary_stream("/megascope.v1.AgentService/Watch")(GARBAGE)),
            "AttachRequest": lambda: _drain(
                workers.stream_stream("/megascope.v1.WorkerService/Attach")(
                    iter([HELLO.SerializeToString(), GARBAGE]), metadata=worker_metadata(agent)
                )
            ),
        }
        for type_name, call in calls.items():
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await call()
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert type_name in (raised.value.details() or "")
        snapshot = await agent_pb2_grpc.AgentServiceStub(channel).GetSnapshot(agent_pb2.GetSnapshotRequest())
    assert snapshot.node_info.node == "node0"


async def _drain(call) -> None:  # type: ignore[no-untyped-def]
    async for _ in call:
        pass
