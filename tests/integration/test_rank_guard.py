"""The rank guard: a rank's abnormal end reaches the agent (signal or exit code, last lines), and torch elastic
sees exactly what the rank did."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.engine.runtime.rank_guard import LOG_TAIL_LINES
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2


@pytest.fixture
async def agent() -> AsyncIterator[AgentServer]:
    server = AgentServer(NodeState(telemetry_pb2.NodeInfo(node="node0")), "127.0.0.1", 0)
    await server.start()
    yield server
    await server.stop(grace_seconds=0.5)


async def guard(script: Path, agent: AgentServer) -> tuple[int, bytes]:
    """The guard as torch elastic starts it under an agent: the worker channel and the job's secret given."""
    env = dict(
        os.environ,
        MEGASCOPE_AGENT_ADDRESS=agent.worker_address,
        MEGASCOPE_AGENT_SECRET=agent.worker_secret,
        RANK="3",
        LOCAL_RANK="1",
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "megascope.engine.runtime.rank_guard", str(script),
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out


async def reports_of(agent: AgentServer) -> list[worker_pb2.ExitReport]:
    exits: list[worker_pb2.ExitReport] = []

    class Listener:
        def rank_attached(self, hello: object) -> None: ...
        def rank_stepped(self, report: object) -> None: ...
        def rank_detached(self, rank: int, pid: int, finished: bool) -> None: ...
        def event_added(self, event: object) -> None: ...
        def rank_exited(self, report: worker_pb2.ExitReport) -> None:
            exits.append(report)

    agent.state.listener = Listener()
    return exits


async def test_a_killed_rank_is_reported_with_its_signal_and_last_lines_and_the_guard_dies_the_same_way(
    agent: AgentServer, tmp_path: Path
) -> None:
    exits = await reports_of(agent)
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, signal, sys\n"
        "for i in range(30):\n    print(f'line {i}')\n"
        "print('about to die', file=sys.stderr)\n"
        "sys.stdout.flush(); sys.stderr.flush()\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    code, out = await guard(script, agent)
    assert code == -signal.SIGKILL  # torch elastic sees the signal, not the guard's own exit
    assert b"line 29" in out and b"about to die" in out  # the rank's output still flows through
    [report] = exits
    assert (report.rank, report.local_rank, report.signal, report.exit_code) == (3, 1, "SIGKILL", 0)
    assert report.log_tail == ["about to die"]  # stderr, where tracebacks go: never pushed out by stdout


async def test_without_stderr_the_report_carries_the_last_lines_of_stdout(agent: AgentServer, tmp_path: Path) -> None:
    exits = await reports_of(agent)
    script = tmp_path / "rank.py"
    script.write_text("import os\nfor i in range(30):\n    print(f'line {i}', flush=True)\nos._exit(3)\n")
    code, _ = await guard(script, agent)
    assert code == 3
    [report] = exits
    assert report.exit_code == 3 and report.log_tail == [f"line {i}" for i in range(30 - LOG_TAIL_LINES, 30)]


async def test_an_exception_is_reported_with_its_exit_code_and_traceback(agent: AgentServer, tmp_path: Path) -> None:
    exits = await reports_of(agent)
    script = tmp_path / "rank.py"
    script.write_text("raise RuntimeError('out of memory, pretend')\n")
    code, _ = await guard(script, agent)
    assert code == 1
    [report] = exits
    assert report.exit_code == 1 and report.signal == ""
    assert any("RuntimeError: out of memory, pretend" in line for line in report.log_tail)


async def test_a_clean_exit_is_not_reported(agent: AgentServer, tmp_path: Path) -> None:
    exits = await reports_of(agent)
    script = tmp_path / "rank.py"
    script.write_text("print('done')\n")
    code, out = await guard(script, agent)
    assert code == 0 and b"done" in out and exits == []
