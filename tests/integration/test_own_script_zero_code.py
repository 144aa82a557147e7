"""Zero code: an ordinary torchrun DDP script (tests/support/scripts/plain_ddp.py, no megascope import) under a real
agent, torchrun and gloo. Its ranks are supervised through their guards alone: crashes named and counted across
restarts, a hang found and its culprit named from py-spy stacks, a clean finish that is no failure, a shell launcher
(``--no-python``) and ``-- python script.py``.

Each test reads what a user would: the agent's events and snapshot over gRPC, and ``megascope status --json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest
from support import REPO, run_megascope

from megascope.protos import events
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2

pytestmark = [
    pytest.mark.timeout(600),
    pytest.mark.skipif(shutil.which("py-spy") is None, reason="reads the stacks of ranks without a stack file"),
]

SCRIPTS = REPO / "tests" / "support" / "scripts"
SCRIPT = SCRIPTS / "plain_ddp.py"
_JOB_ENDS = {"job_finished", "job_failed"}


@contextmanager
def agent(tmp_path: Path, *args: str) -> Iterator[str]:
    """``megascope agent --port 0 ARGS`` (ARGS end with ``-- COMMAND``); its address while it runs."""
    process = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--node", "node0",
         "--run-dir", str(tmp_path), *args],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHON=sys.executable),
    )  # fmt: skip
    try:
        assert process.stdout is not None
        yield process.stdout.readline().strip().rsplit(" ", 1)[-1]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()


async def _events(address: str) -> list[telemetry_pb2.Event]:
    async with grpc.aio.insecure_channel(address) as channel:
        response = await agent_pb2_grpc.AgentServiceStub(channel).GetEvents(agent_pb2.GetEventsRequest())
        return list(response.events)


async def _snapshot(address: str) -> agent_pb2.GetSnapshotResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        response: agent_pb2.GetSnapshotResponse = await agent_pb2_grpc.AgentServiceStub(channel).GetSnapshot(
            agent_pb2.GetSnapshotRequest()
        )
        return response


async def _restart(address: str) -> agent_pb2.RestartResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        response: agent_pb2.RestartResponse = await agent_pb2_grpc.AgentServiceStub(channel).Restart(
            agent_pb2.RestartRequest(reason="test")
        )
        return response


async def _dump_stacks(address: str) -> agent_pb2.DumpStacksResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        response: agent_pb2.DumpStacksResponse = await agent_pb2_grpc.AgentServiceStub(channel).DumpStacks(
            agent_pb2.DumpStacksRequest()
        )
        return response


def job_events(address: str, timeout: float = 400) -> list[telemetry_pb2.Event]:
    """The agent's events once torchrun is done with the job (finished, or gave up)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = asyncio.run(_events(address))
        if any(e.kind in _JOB_ENDS for e in found):
            return found
        time.sleep(0.5)
    raise AssertionError(f"the job did not end in {timeout:.0f}s")


def of_kind(found: list[telemetry_pb2.Event], kind: str) -> list[telemetry_pb2.Event]:
    return [e for e in found if e.kind == kind]


def status_json(address: str) -> dict:  # type: ignore[type-arg]
    result = run_megascope("status", "--agents", address, "--json", timeout=60)
    assert result.returncode == 0, result.stderr
    summary: dict = json.loads(result.stdout)  # type: ignore[type-arg]
    return summary


def test_a_crash_is_named_with_its_rank_and_each_restart_is_counted_and_closes_its_incident(tmp_path: Path) -> None:
    with agent(
        tmp_path, "--nproc-per-node", "2", "--max-restarts", "2", "--",
        str(SCRIPT), "--steps", "12", "--crash-rank", "1", "--crash-step", "5", "--crash-attempts", "0,1",
    ) as address:  # fmt: skip
        found = job_events(address)
        crashes = of_kind(found, "crash")
        assert [c.rank for c in crashes] == [1, 1], [e.text for e in found]
        for crash in crashes:
            # Its exception ends it; under load torch elastic's SIGTERM (the peer aborted first) may overtake its exit.
            assert "exited with code 1" in crash.text or "killed by SIGTERM" in crash.text, crash.text
            assert "step unknown" in crash.text, crash.text
            assert not crash.HasField("step") and not crash.crash.HasField("last_step")  # never a made-up step 0
            assert any("failed at step 5" in line for line in crash.crash.log_tail)
        assert [c.crash.restart_count for c in crashes] == [0, 1]
        restarts = of_kind(found, "restart")
        assert len(restarts) == 2 and all(r.restart.mttr_seconds > 0 for r in restarts)
        [finished] = of_kind(found, "job_finished")
        assert finished.job.restarts == 2
        assert status_json(address)["header"]["restarts"] == 2


def test_a_hang_is_found_without_step_reports_and_its_culprit_named_from_py_spy_stacks(tmp_path: Path) -> None:
    # The culprit spins on the CPU in one place (as a busy wait does): CPU time alone is no progress.
    with agent(
        tmp_path, "--nproc-per-node", "2", "--max-restarts", "1", "--hang-timeout", "6", "--",
        str(SCRIPT), "--steps", "10", "--hang-rank", "1", "--hang-step", "4", "--hang-how", "spin",
    ) as address:  # fmt: skip
        found = job_events(address)
        [hang] = of_kind(found, "hang")
        assert hang.rank == 1 and hang.hang.verdict == telemetry_pb2.HangDetail.VERDICT_CULPRIT, hang.text
        assert (hang.hang.ranks_answered, hang.hang.ranks_total) == (2, 2)
        assert "py-spy" in hang.hang.how and "step unknown" in hang.text
        assert of_kind(found, "crash") == []  # the ranks the agent stopped are no crash
        assert len(of_kind(found, "restart")) == 1 and len(of_kind(found, "job_finished")) == 1


def running_ranks(address: str, count: int, timeout: float = 180) -> list[telemetry_pb2.RankStatus]:
    """The ranks, once ``count`` of them run and wrote something."""
    deadline = time.monotonic() + timeout
    while True:
        ranks = list(asyncio.run(_snapshot(address)).rank_statuses)
        if sum(r.state == telemetry_pb2.RANK_STATE_RUNNING and r.output_lines > 0 for r in ranks) == count:
            return ranks
        assert time.monotonic() < deadline, f"ranks never ran: {ranks}"
        time.sleep(0.2)


def test_a_script_that_finishes_is_no_failure_and_its_ranks_are_known_and_read_with_py_spy(tmp_path: Path) -> None:
    # `-- python SCRIPT`, as a user types it: the interpreter is ours, not run as the script.
    with agent(tmp_path, "--nproc-per-node", "2", "--", "python", str(SCRIPT), "--steps", "400") as address:
        ranks = running_ranks(address, 2)
        assert all(r.source == telemetry_pb2.RANK_SOURCE_PROCESS for r in ranks)
        stacks = asyncio.run(_dump_stacks(address))
        assert sorted(r.rank for r in stacks.ranks if r.answered and r.method == "py-spy") == [0, 1]
        assert all("plain_ddp.py" in r.text for r in stacks.ranks)

        found = job_events(address)
        assert of_kind(found, "crash") == [] and of_kind(found, "rank_lost") == [], [e.text for e in found]
        assert len(of_kind(found, "job_finished")) == 1
        final = asyncio.run(_snapshot(address)).rank_statuses
        assert sorted((r.rank, r.state) for r in final) == [
            (0, telemetry_pb2.RANK_STATE_EXITED),
            (1, telemetry_pb2.RANK_STATE_EXITED),
        ]
        assert events.kind_of(found[-1]) == "job_finished"


def test_a_shell_launcher_with_no_python_is_supervised_down_to_its_python_rank(tmp_path: Path) -> None:
    # The wrapper runs the script as its child: the stacks come from that child, and stopping the hung rank stops it.
    with agent(
        tmp_path, "--nproc-per-node", "2", "--max-restarts", "1", "--hang-timeout", "6", "--no-python", "--",
        "sh", str(SCRIPTS / "wrapper.sh"), "--steps", "10", "--hang-rank", "0", "--hang-step", "3",
    ) as address:  # fmt: skip
        found = job_events(address)
        [hang] = of_kind(found, "hang")
        assert hang.rank == 0 and "py-spy" in hang.hang.how, hang.text
        assert len(of_kind(found, "restart")) == 1 and len(of_kind(found, "job_finished")) == 1


def test_a_restart_asked_for_stops_a_scripts_ranks_and_torch_elastic_runs_them_again(tmp_path: Path) -> None:
    with agent(tmp_path, "--nproc-per-node", "2", "--max-restarts", "1", "--", str(SCRIPT), "--steps", "60",
               "--step-seconds", "0.2") as address:  # fmt: skip
        running_ranks(address, 2)
        response = asyncio.run(_restart(address))
        assert response.ranks_stopped == 2 and response.step == 0
        found = job_events(address)
        assert len(of_kind(found, "restart_requested")) == 1 and of_kind(found, "crash") == []
        [restart] = of_kind(found, "restart")
        assert restart.restart.cause == telemetry_pb2.RestartDetail.CAUSE_REQUESTED
        assert len(of_kind(found, "job_finished")) == 1
