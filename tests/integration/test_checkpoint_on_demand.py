"""Saving a checkpoint on demand through the agent's SaveCheckpoint control RPC."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from support import REPO, read_telemetry

from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.engine.checkpoint import committed_steps
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2


async def save_checkpoint(address: str, step: int = 0, token: str | None = None) -> agent_pb2.SaveCheckpointResponse:
    metadata = (("authorization", f"Bearer {token}"),) if token else None
    async with grpc.aio.insecure_channel(address) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        return await stub.SaveCheckpoint(agent_pb2.SaveCheckpointRequest(step=step), metadata=metadata)


@pytest.mark.parametrize(
    ("token", "code"),
    [(None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.PERMISSION_DENIED),
     ("secret", grpc.StatusCode.FAILED_PRECONDITION)],
    ids=["no-token", "wrong-token", "right-token-but-no-ranks"],
)  # fmt: skip
async def test_control_rpc_needs_the_agents_token(token: str | None, code: grpc.StatusCode) -> None:
    server = AgentServer(NodeState(telemetry_pb2.NodeInfo(node="n")), "127.0.0.1", 0, token="secret")
    await server.start()
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await save_checkpoint(server.address, token=token)
        assert raised.value.code() == code
    finally:
        await server.stop(0.1)


def test_save_requested_through_the_agent_is_committed_at_the_step_it_names(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    agent = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--exit-when-done",
         "--nproc-per-node", "2", "--steps", "60", "--batch-tokens", "256", "--val-every", "0",
         "--ckpt-dir", str(ckpt), "--run-dir", str(tmp_path / "run")],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        address = agent.stdout.readline().strip().rsplit(" ", 1)[-1]
        telemetry = tmp_path / "run" / "telemetry" / "rank0.jsonl"
        deadline = time.monotonic() + 120
        while not (telemetry.exists() and '"step": 5,' in telemetry.read_text()):
            assert time.monotonic() < deadline and agent.poll() is None, "training did not start"
            time.sleep(0.2)
        response = asyncio.run(save_checkpoint(address))
        assert response.ranks == 2 and 5 < response.step < 60
        assert agent.wait(timeout=180) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
    assert committed_steps(ckpt) == [response.step, 60]
    saves = [r for r in read_telemetry(tmp_path / "run")[0] if r["type"] == "event" and r["kind"] == "checkpoint"]
    assert [e["checkpoint"]["step"] for e in saves] == [response.step, 60]
