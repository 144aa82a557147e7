"""A rank's link to its agent never holds training up: absent agent, agent that dies, agent that returns."""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

import pytest
from support import read_telemetry, run_megascope
from support.agents import STAND_IN_RANKS, serving_agent, wait_until
from support.wire import step_report

from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.dashboard.local_cluster import free_port
from megascope.engine.runtime import agent_link
from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV, AgentSink
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2

HELLO = worker_pb2.Hello(rank=0, local_rank=0, world_size=1, pid=os.getpid(), node="node0")


def test_writes_return_at_once_and_are_counted_as_dropped_while_no_agent_listens() -> None:
    sink = AgentSink(f"127.0.0.1:{free_port()}", HELLO)
    start = time.perf_counter()
    for step in range(1, 1001):
        sink.write_step(step_report(0, step))
    elapsed = time.perf_counter() - start
    sink.close(timeout=0.5)
    assert elapsed < 0.5  # no waiting on the network: ~0.1 ms a report for building the message
    assert sink.dropped == 1000 and not sink.connected


async def test_sink_reconnects_when_the_agent_comes_back_on_its_port() -> None:
    socket = Path(tempfile.mkdtemp(prefix="sink-")) / "agent.sock"  # short: a socket's path has a length limit
    sink = AgentSink(f"unix:{socket}", HELLO, secret="the job's secret")
    await asyncio.sleep(0.5)  # a few failed connection attempts
    assert not sink.connected
    for attempt in range(2):  # the agent starts, dies, and comes back
        server = AgentServer(
            NodeState(telemetry_pb2.NodeInfo(node="node0")), "127.0.0.1", 0,
            worker_socket=socket, worker_secret="the job's secret", launched=STAND_IN_RANKS,
        )  # fmt: skip
        await server.start()
        await wait_until(lambda: sink.connected, timeout=15)
        sink.write_step(step_report(0, attempt + 1, world_size=1))  # HELLO's world: the agent checks it
        await wait_until(lambda server=server: len(server.state.step_reports) == 1)
        await server.stop(grace_seconds=0.1)
        await wait_until(lambda: not sink.connected)
    assert sink.connects == 2
    await asyncio.to_thread(sink.close, 0.5)


async def test_close_sends_what_is_queued_and_ends_the_stream_without_waiting_for_a_heartbeat(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A failing rank exits (and its replacement starts) only once its sink is closed: the stream must end now, not
    # when the idle stream's next heartbeat is due (an hour here; a second in real life).
    monkeypatch.setattr(agent_link, "_HEARTBEAT_SECONDS", 3600.0)
    async with serving_agent(launched=STAND_IN_RANKS) as server:
        sink = AgentSink(server.worker_address, HELLO, secret=server.worker_secret)
        await wait_until(lambda: sink.connected, timeout=30)
        sink.write_step(step_report(0, 1, world_size=1))
        started = time.monotonic()
        await asyncio.to_thread(sink.close, 60.0)
        assert time.monotonic() - started < 30.0  # waiting for the heartbeat would take the whole 60 s, then cancel
        assert [r.step for r in server.state.step_reports] == [1]


def test_training_finishes_when_the_agent_address_points_nowhere(tmp_path: Path) -> None:
    os.environ[AGENT_ADDRESS_ENV] = f"127.0.0.1:{free_port()}"
    try:
        result = run_megascope(
            "train", "--preset", "tiny", "--steps", "5", "--batch-tokens", "256", "--val-every", "0",
            "--run-dir", str(tmp_path), timeout=120,
        )  # fmt: skip
    finally:
        del os.environ[AGENT_ADDRESS_ENV]
    assert result.returncode == 0, result.stderr[-2000:]
    steps = [r["step"] for r in read_telemetry(tmp_path)[0] if r["type"] == "step"]
    assert steps == [1, 2, 3, 4, 5]
