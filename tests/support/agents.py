"""Helpers for tests that serve a real AgentService in-process: waits, checkpoints to list, a merge-capable agent,
and stand-in ranks on the agent's worker channel (its Unix socket, with the job's secret)."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import torch

from megascope.agent.merges import MergeRunner
from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.agent.validation import Launched
from megascope.engine.checkpoint import Checkpointer
from megascope.engine.runtime.agent_link import AgentSink, secret_metadata
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2, worker_pb2_grpc
from support import REPO

STAND_IN_RANKS = Launched()
"""What an agent checks the claims of this test's stand-in ranks against: nothing about processes (their pids are
made up; the agent never signals them, as they are not its descendants) nor the world (any size)."""


def worker_metadata(server: AgentServer) -> tuple[tuple[str, str], ...]:
    """The metadata a rank that ``server`` launched sends: the job's secret."""
    return secret_metadata(server.worker_secret)


def worker_sink(server: AgentServer, hello: worker_pb2.Hello) -> AgentSink:
    """The engine's real sink on ``server``'s worker channel, as a rank the agent launched uses it."""
    return AgentSink(server.worker_address, hello, secret=server.worker_secret)


async def attach(server: AgentServer, *messages: worker_pb2.AttachRequest, metadata: object = None) -> Exception | None:
    """Send raw messages on a worker stream (with the job's secret unless ``metadata`` says otherwise); the error
    the agent ended it with, or None."""
    async with grpc.aio.insecure_channel(server.worker_address) as channel:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Attach(
            iter(messages), metadata=worker_metadata(server) if metadata is None else metadata
        )
        try:
            async for _ in call:
                pass
        except grpc.aio.AioRpcError as error:
            return error
    return None


async def wait_until(condition, timeout: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


STAND_IN = [sys.executable, str(REPO / "tests" / "support" / "merge_stand_in.py")]


AGENT_WITH_A_MERGE = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from megascope.agent.merges import MergeRunner
    from megascope.agent.state import NodeState
    from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

    async def main():
        # The merge's stdout goes to a file, not to the agent: its death must come from the parent-death tie,
        # not from a broken pipe on its next progress line.
        command = ["sh", "-c", 'exec "$@" > "$0.out"', sys.argv[3], sys.executable, sys.argv[2]]
        runner = MergeRunner(NodeState(telemetry_pb2.NodeInfo(node="n")), Path(sys.argv[1]), command=command)
        run = runner.start(runner.plan(agent_pb2.StartMergeRequest(method="sma", last=2)))
        while run.process is None:
            await asyncio.sleep(0.01)
        print(run.process.pid, run.plan.out, flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
    """
)
"""An agent that starts a merge (``sma``, the last 2) of checkpoint directory ARGV[1] with the merge command ARGV[2]
(its stdout to ARGV[3].out), prints the merge's pid and output path, then waits to be killed."""


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


@contextlib.asynccontextmanager
async def serving_agent(
    node_info: telemetry_pb2.NodeInfo | None = None, launched: Launched | None = None
) -> AsyncIterator[AgentServer]:
    """A real AgentService on 127.0.0.1 (a free port) in this process, stopped on leaving."""
    state = NodeState(node_info or telemetry_pb2.NodeInfo(node="node0"))
    server = AgentServer(state, "127.0.0.1", 0, launched=launched) if launched else AgentServer(state, "127.0.0.1", 0)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_seconds=0.5)
