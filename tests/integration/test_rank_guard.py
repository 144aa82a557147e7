"""The rank guard: a rank's abnormal end reaches the agent (signal or exit code, last lines), and torch elastic
sees exactly what the rank did; it attaches as its rank's guard (output lines, CPU time, a clean finish), runs a
command as given with --no-python, and needs no agent."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.agents import serving_agent

from megascope.agent.server import AgentServer
from megascope.engine.runtime.rank_guard import LOG_TAIL_LINES
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2


@pytest.fixture
async def agent() -> AsyncIterator[AgentServer]:
    async with serving_agent() as server:
        yield server


async def guard(script: Path | None, agent: AgentServer | str | None, *command: str) -> tuple[int, bytes]:
    """The guard as torch elastic starts it under an agent (None: without one; a string: the agent's address): the
    worker channel and the job's secret given; ``script``, or ``command`` as the guard's own arguments."""
    env = dict(os.environ, RANK="3", LOCAL_RANK="1", WORLD_SIZE="4")
    env.pop("MEGASCOPE_AGENT_ADDRESS", None)
    if isinstance(agent, AgentServer):
        env.update(MEGASCOPE_AGENT_ADDRESS=agent.worker_address, MEGASCOPE_AGENT_SECRET=agent.worker_secret)
    elif agent is not None:
        env.update(MEGASCOPE_AGENT_ADDRESS=agent, MEGASCOPE_AGENT_SECRET="secret")
    arguments = [str(script)] if script is not None else list(command)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "megascope.engine.runtime.rank_guard", *arguments,
        env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out


async def reports_of(agent: AgentServer) -> list[worker_pb2.ExitReport]:
    exits: list[worker_pb2.ExitReport] = []

    class Listener:
        def rank_attached(self, hello: object) -> None: ...
        def rank_progressed(self, rank: int, pid: int, output: bool, cpu: bool) -> None: ...
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


async def test_the_guard_attaches_for_its_rank_with_its_output_and_cpu_time_and_a_clean_exit_finishes_it(
    agent: AgentServer, tmp_path: Path
) -> None:
    script = tmp_path / "rank.py"
    script.write_text(
        "import time\n"
        "for i in range(5):\n    print(f'line {i}', flush=True)\n"
        "end = time.process_time() + 0.3\n"
        "while time.process_time() < end: pass\n"
        "time.sleep(2.5)\n"
    )
    code, out = await guard(script, agent)
    assert code == 0 and b"line 4" in out
    status = agent.state.ranks[3]
    assert status.state == telemetry_pb2.RANK_STATE_EXITED and status.source == telemetry_pb2.RANK_SOURCE_PROCESS
    assert status.output_lines == 5 and status.cpu_seconds > 0.3
    assert all(e.kind != "rank_lost" for e in agent.state.events)


async def test_with_no_python_the_command_runs_as_given(agent: AgentServer) -> None:
    code, out = await guard(None, agent, "--no-python", "sh", "-c", "echo from the shell; exit 4")
    assert code == 4 and b"from the shell" in out


async def test_without_an_agent_the_rank_runs_alone(tmp_path: Path) -> None:
    script = tmp_path / "rank.py"
    script.write_text("print('alone')\n")
    code, out = await guard(script, None)
    assert code == 0 and out.strip() == b"alone"


async def test_an_agent_that_never_answers_does_not_keep_the_guard_from_ending_as_its_rank_did(tmp_path: Path) -> None:
    # A port that takes connections (the kernel's backlog) and never speaks gRPC: the report's call and the guard's
    # stream to it wait, and must not outlast their bounds.
    with socket.create_server(("127.0.0.1", 0)) as silent:
        script = tmp_path / "rank.py"
        script.write_text("print('working', flush=True)\nraise SystemExit(5)\n")
        code, out = await guard(script, f"127.0.0.1:{silent.getsockname()[1]}")
    assert code == 5 and b"working" in out


def test_a_guard_stuck_in_its_ending_exits_with_every_threads_stack() -> None:
    # gRPC can deadlock while a channel closes (grpc#42247): the guard's C watchdog ends it anyway, with the stacks.
    stuck = (
        "import threading\n"
        "from megascope.engine.runtime import rank_guard\n"
        "rank_guard.ENDING_SECONDS = 0.5\n"
        "rank_guard._bound_the_ending()\n"
        "threading.Event().wait()  # as if closing a channel never returned\n"
    )
    ended = subprocess.run([sys.executable, "-c", stuck], capture_output=True, text=True, timeout=120, check=False)
    assert ended.returncode == 1
    assert "Timeout" in ended.stderr and "threading.py" in ended.stderr
