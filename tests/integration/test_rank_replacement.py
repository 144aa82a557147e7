"""In-place replacement of a failed rank, run for real: torchrun under engine/runtime/elastic.py hosting the recovery
store, each rank's guard (engine/runtime/rank_guard.py) forking it from a warm parent, an agent's server watching.

The rank is a tiny module (tests/support/scripts/warm_rank.py), let under a warm parent by
``MEGASCOPE_WARM_MODULES`` (the guard's gate otherwise admits only our trainer): what is checked is the process side
of recovery (who is replaced, how the guard ends, what the agent and torch elastic see), not the trainer's."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from support.agents import serving_agent

from megascope.agent.server import AgentServer
from megascope.engine.runtime import launch, recovery_env
from megascope.engine.runtime.rank_guard import WARM_MODULES_ENV
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2

_TESTS = Path(__file__).resolve().parent.parent
_RANK = "support.scripts.warm_rank"
_DEADLINE = 120.0
"""Only a guard against hanging forever."""


def records(directory: Path, rank: int) -> list[dict[str, Any]]:
    """What each process of ``rank`` wrote when it started, oldest first."""
    found = [json.loads(path.read_text()) for path in directory.glob(f"rank{rank}-*.json")]
    return sorted(found, key=lambda record: record["started"])


def wait_for(condition: Any, what: str) -> None:
    deadline = time.monotonic() + _DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def guard_env(**extra: str) -> dict[str, str]:
    """A guard's environment as torch elastic gives it with recovery in place (the store's address is not used by
    the module unless it is asked to connect)."""
    env = dict(os.environ, RANK="3", LOCAL_RANK="1", WORLD_SIZE="4", PYTHONPATH=str(_TESTS))
    env.pop("MEGASCOPE_AGENT_ADDRESS", None)
    env.pop(recovery_env.REPLACEMENT_ENV, None)
    env.update({recovery_env.RECOVERY_STORE_ENV: "127.0.0.1:1", WARM_MODULES_ENV: _RANK}, **extra)
    return env


async def run_guard(directory: Path, *args: str, env: dict[str, str] | None = None) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "megascope.engine.runtime.rank_guard", "-m", _RANK, str(directory), *args,
        env=env or guard_env(), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip


# --- the guard alone, and under an agent -------------------------------------------------------------------------


async def test_a_replacement_that_fails_again_at_once_is_not_replaced_and_the_guard_exits_with_its_code(
    tmp_path: Path,
) -> None:
    process = await run_guard(tmp_path, "exit", "3")
    out, _ = await process.communicate()
    assert process.returncode == 3, out.decode()
    assert [r["replacement"] for r in records(tmp_path, 3)] == [0, 1]  # replaced once, then the fault repeated
    assert b"replacing it in place (replacement 1)" in out


async def test_a_rank_that_could_not_recover_in_place_ends_its_guard_at_once(tmp_path: Path) -> None:
    process = await run_guard(tmp_path, "exit", str(recovery_env.RECOVERY_FAILED_EXIT))
    await process.communicate()
    assert process.returncode == recovery_env.RECOVERY_FAILED_EXIT
    assert len(records(tmp_path, 3)) == 1  # torch elastic restarts the job: no replacement


async def test_sigterm_to_the_guard_stops_its_rank_without_a_replacement_and_the_guard_dies_of_it(
    tmp_path: Path,
) -> None:
    process = await run_guard(tmp_path, "wait")
    await asyncio.to_thread(wait_for, lambda: records(tmp_path, 3), "the rank started")
    process.send_signal(signal.SIGTERM)  # torch elastic stopping the group
    await process.communicate()
    assert process.returncode == -signal.SIGTERM
    assert len(records(tmp_path, 3)) == 1


@pytest.fixture
async def agent() -> AsyncIterator[AgentServer]:
    async with serving_agent() as server:
        yield server


class _Seen:
    """What the agent was told: guards attaching (their Hello) and ranks' exits (the guards' reports)."""

    def __init__(self) -> None:
        self.guards: list[worker_pb2.Hello] = []
        self.exits: list[worker_pb2.ExitReport] = []

    def rank_attached(self, hello: worker_pb2.Hello) -> None:
        if hello.role == worker_pb2.WORKER_ROLE_GUARD:
            self.guards.append(hello)

    def rank_progressed(self, rank: int, pid: int, output: bool, cpu: bool) -> None: ...
    def rank_stepped(self, report: object) -> None: ...
    def rank_detached(self, rank: int, pid: int, finished: bool) -> None: ...
    def rank_failed(self, report: object) -> None: ...
    def self_checked(self, result: object) -> None: ...

    def rank_exited(self, report: worker_pb2.ExitReport) -> None:
        self.exits.append(report)


async def _until(condition: Any, what: str) -> None:
    deadline = time.monotonic() + _DEADLINE
    while not condition():
        assert time.monotonic() < deadline, f"never: {what}"
        await asyncio.sleep(0.05)


async def guard_under(agent: AgentServer, directory: Path, *args: str) -> tuple[_Seen, asyncio.subprocess.Process]:
    """A guard of rank 3 (the module run with ``args``) under ``agent``, and what the agent is told of it."""
    seen = _Seen()
    agent.state.listener = seen  # type: ignore[assignment]
    env = guard_env(MEGASCOPE_AGENT_ADDRESS=agent.worker_address, MEGASCOPE_AGENT_SECRET=agent.worker_secret)
    return seen, await run_guard(directory, *args, env=env)


async def test_the_agent_sees_the_replacement_attach_as_a_new_process_of_the_same_rank(
    agent: AgentServer, tmp_path: Path
) -> None:
    seen, process = await guard_under(agent, tmp_path, "wait")
    await _until(lambda: seen.guards, "the guard attached")
    first = seen.guards[0].pid
    os.kill(first, signal.SIGKILL)
    await _until(lambda: len(seen.guards) == 2, "the guard attached again for the replacement")
    second = seen.guards[1]
    assert second.pid != first and (second.rank, second.restart_count) == (3, seen.guards[0].restart_count)
    assert [r["pid"] for r in records(tmp_path, 3)] == [first, second.pid]
    assert process.returncode is None  # torch elastic would see nothing
    assert [(r.pid, r.signal) for r in seen.exits] == [(first, "SIGKILL")]
    status = agent.state.ranks[3]
    assert status.pid == second.pid and status.state != telemetry_pb2.RANK_STATE_FAILED
    (tmp_path / "stop").touch()
    await process.communicate()
    assert process.returncode == 0


async def test_a_rank_that_could_not_recover_is_reported_with_what_its_exit_code_means(
    agent: AgentServer, tmp_path: Path
) -> None:
    seen, process = await guard_under(agent, tmp_path, "exit", str(recovery_env.RECOVERY_FAILED_EXIT))
    await process.communicate()
    [report] = seen.exits
    assert report.exit_code == recovery_env.RECOVERY_FAILED_EXIT
    assert report.cause == recovery_env.exit_cause(recovery_env.RECOVERY_FAILED_EXIT) != ""


# --- under torchrun -----------------------------------------------------------------------------------------------


@pytest.fixture
def torchrun_of(tmp_path: Path) -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    (tmp_path / "stop").touch()
    for process in started:
        launch.stop(process)


def start_job(tmp_path: Path, nproc: int, started: list[Any]) -> Any:
    options = launch.LaunchOptions(nproc_per_node=nproc, recovery="inplace")
    entry = ["-m", _RANK, str(tmp_path), "wait", "--torch"]
    extra = {WARM_MODULES_ENV: _RANK, "PYTHONPATH": str(_TESTS)}
    process = launch.start(options, entry, tmp_path / "logs", extra)
    started.append(process)
    return process


def test_torchruns_process_hosts_the_recovery_store_on_loopback_and_ranks_reach_it(
    tmp_path: Path, torchrun_of: list[Any]
) -> None:
    process = start_job(tmp_path, 2, torchrun_of)  # in place needs 2 ranks: one to take the state from
    wait_for(lambda: records(tmp_path, 0), "rank 0 started")
    [rank0] = records(tmp_path, 0)
    assert rank0["store_count"] in (1, 2)  # it added to a key of the store as a client (rank 1 adds too)
    host, port = recovery_env.store_address({recovery_env.RECOVERY_STORE_ENV: rank0["store"]}) or ("", 0)
    listening = {
        (c.laddr.ip, c.laddr.port)
        for c in psutil.Process(process.pid).net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert (host, port) == ("127.0.0.1", port) and (host, port) in listening
    (tmp_path / "stop").touch()
    assert process.wait(_DEADLINE) == 0


def test_a_killed_rank_is_replaced_in_place_and_torch_elastic_never_restarts(
    tmp_path: Path, torchrun_of: list[Any]
) -> None:
    process = start_job(tmp_path, 2, torchrun_of)
    wait_for(lambda: records(tmp_path, 0) and records(tmp_path, 1), "both ranks started")
    [rank0], [rank1] = records(tmp_path, 0), records(tmp_path, 1)
    os.kill(rank1["pid"], signal.SIGKILL)
    wait_for(lambda: len(records(tmp_path, 1)) == 2, "rank 1 replaced")
    replacement = records(tmp_path, 1)[1]
    # the same attempt of torch elastic (no restart), the same store, rank 0 untouched
    assert (replacement["replacement"], replacement["restart_count"]) == (1, 0)
    assert replacement["store"] == rank1["store"] and replacement["store_count"] == 3
    assert records(tmp_path, 0) == [rank0] and psutil.pid_exists(rank0["pid"])
    (tmp_path / "stop").touch()
    assert process.wait(_DEADLINE) == 0
