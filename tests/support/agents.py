"""Helpers for tests that serve a real AgentService in-process: waits, checkpoints to list, a merge-capable agent."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

import torch

from megascope.agent.merges import MergeRunner
from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.engine.checkpoint import Checkpointer
from megascope.protos.megascope.v1 import telemetry_pb2
from support import REPO


async def wait_until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


STAND_IN = [sys.executable, str(REPO / "tests" / "support" / "merge_stand_in.py")]


STEPS = (10, 20, 30, 40)


def write_checkpoints(directory: Path, steps: tuple[int, ...] = STEPS) -> None:
    """Committed checkpoints of a two-tensor state, written by the engine's own checkpointer."""
    checkpointer = Checkpointer(directory, keep_last=0)
    for step in steps:
        checkpointer.save(step, {"w": torch.full((64, 64), float(step)), "b": torch.zeros(64)}, extra={"step": step})
        checkpointer.wait()
    checkpointer.close()


async def serve(
    ckpt_dir: Path | None, command: list[str] = STAND_IN, token: str | None = None, grace: float = 10.0
) -> AgentServer:
    state = NodeState(telemetry_pb2.NodeInfo(node="node0"))
    runner = MergeRunner(state, ckpt_dir, command=command, cancel_grace_seconds=grace)
    server = AgentServer(state, "127.0.0.1", 0, token=token, merges=runner)
    await server.start()
    return server
