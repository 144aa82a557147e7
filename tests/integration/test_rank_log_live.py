"""A rank's output, end to end: an ordinary torchrun script (tests/support/scripts/plain_ddp.py, no megascope import)
under a real agent, torchrun and gloo; its guards send what each rank prints, and GetRankLog answers it."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from support import REPO

from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2, worker_pb2

pytestmark = pytest.mark.timeout(600)

SCRIPT = REPO / "tests" / "support" / "scripts" / "plain_ddp.py"
STEPS = 12


@contextmanager
def agent(tmp_path: Path, *args: str) -> Iterator[tuple[str, list[str]]]:
    """``megascope agent --port 0 ARGS``: its address, and the lines it writes (read on a thread, so the ranks'
    output, copied through to it, never fills a pipe)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--node", "node0",
         "--run-dir", str(tmp_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert process.stdout is not None
    address = process.stdout.readline().strip().rsplit(" ", 1)[-1]
    output: list[str] = []
    threading.Thread(target=lambda: output.extend(process.stdout or ()), daemon=True).start()
    try:
        yield address, output
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


async def _call(address: str, method: str, request: object) -> object:
    async with grpc.aio.insecure_channel(address) as channel:
        return await getattr(agent_pb2_grpc.AgentServiceStub(channel), method)(request, timeout=30)


def rank_log(address: str, rank: int, max_lines: int = 0) -> agent_pb2.GetRankLogResponse:
    answer = asyncio.run(_call(address, "GetRankLog", agent_pb2.GetRankLogRequest(rank=rank, max_lines=max_lines)))
    assert isinstance(answer, agent_pb2.GetRankLogResponse)
    return answer


def job_finished(address: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = asyncio.run(_call(address, "GetEvents", agent_pb2.GetEventsRequest()))
        assert isinstance(found, agent_pb2.GetEventsResponse)
        if any(e.kind in ("job_finished", "job_failed") for e in found.events):
            return
        time.sleep(0.5)
    raise AssertionError(f"the job did not end in {timeout:.0f}s")


def step_lines(answer: agent_pb2.GetRankLogResponse) -> list[str]:
    return [line.text for line in answer.lines if " step " in line.text]


def test_get_rank_log_returns_what_each_rank_of_a_plain_script_printed(tmp_path: Path) -> None:
    with agent(tmp_path, "--nproc-per-node", "2", "--", str(SCRIPT), "--steps", str(STEPS)) as (address, output):
        job_finished(address)
        for rank in (0, 1):
            answer = rank_log(address, rank)
            printed = step_lines(answer)
            # Every step's line, once, in order: the last ones too (sent after the rank exited).
            assert [text.rsplit(" loss ", 1)[0] for text in printed] == [
                f"rank {rank} step {step}" for step in range(1, STEPS + 1)
            ], [line.text for line in answer.lines]
            assert all(line.stream == telemetry_pb2.LOG_STREAM_STDOUT for line in answer.lines if " step " in line.text)
            first = answer.lines[0]
            assert first.stream == telemetry_pb2.LOG_STREAM_AGENT
            assert first.text == f"--- rank {rank}: process {answer.pid} started, attempt 0 ---"
            assert answer.lines_dropped == 0
            assert [line.seq for line in answer.lines] == list(range(1, len(answer.lines) + 1))
        # The guard still copies the output through: the agent's own stdout has the ranks' lines.
        assert any("rank 1 step 12" in line for line in output)


def test_get_rank_log_answers_the_newest_lines_asked_for_and_refuses_a_rank_outside_the_job(tmp_path: Path) -> None:
    with agent(tmp_path, "--nproc-per-node", "2", "--", str(SCRIPT), "--steps", str(STEPS)) as (address, _):
        job_finished(address)
        newest = rank_log(address, 0, max_lines=3)
        assert step_lines(newest)[-1].startswith(f"rank 0 step {STEPS} ")
        assert len(newest.lines) == 3 and newest.lines_left_out > 0
        with pytest.raises(grpc.RpcError) as refused:
            rank_log(address, 2)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        assert "rank: the job has ranks 0 to 1, got 2" in refused.value.details()  # type: ignore[attr-defined]


async def test_get_rank_log_is_a_read_under_token_reads_and_a_rank_of_another_node_is_not_found() -> None:
    state = NodeState(telemetry_pb2.NodeInfo(node="node0", world_size=4))
    state.rank_attached(worker_pb2.Hello(rank=0, world_size=4, pid=4242, role=worker_pb2.WORKER_ROLE_GUARD))
    server = AgentServer(state, "127.0.0.1", 0, token="t0ken", token_reads=True)
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as no_token:
                await stub.GetRankLog(agent_pb2.GetRankLogRequest(rank=0), timeout=20)
            assert no_token.value.code() == grpc.StatusCode.UNAUTHENTICATED
            token = (("authorization", "Bearer t0ken"),)
            answer = await stub.GetRankLog(agent_pb2.GetRankLogRequest(rank=0), timeout=20, metadata=token)
            assert [line.text for line in answer.lines] == ["--- rank 0: process 4242 started, attempt 0 ---"]
            with pytest.raises(grpc.aio.AioRpcError) as elsewhere:
                await stub.GetRankLog(agent_pb2.GetRankLogRequest(rank=3), timeout=20, metadata=token)
            assert elsewhere.value.code() == grpc.StatusCode.NOT_FOUND
            assert "rank 3 does not run on node node0 (its ranks: 0)" in (elsewhere.value.details() or "")
    finally:
        await server.stop(0.1)
