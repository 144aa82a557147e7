"""`megascope status`: one snapshot for scripts, as text or JSON; exit 1 when an agent cannot be reached."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator

import pytest
from support import REPO, run_megascope
from support.fake_agent import FakeAgent, serve

from megascope.protos.megascope.v1 import telemetry_pb2

NOBODY = "127.0.0.1:1"  # nothing listens on port 1


async def status(*args: str) -> tuple[int, str, str]:
    """`megascope status ARGS` in a subprocess, while this test's event loop keeps serving the fake agent."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "megascope.agent.cli", "status", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, stdout.decode(), stderr.decode()


@pytest.fixture
async def agent() -> AsyncIterator[str]:
    """A 2-rank node at step 7 on an in-test AgentService; yields its address."""
    info = telemetry_pb2.NodeInfo(node="node0", ranks=[0, 1], world_size=2, start_wall_time=time.time())
    statuses = [telemetry_pb2.RankStatus(rank=r, pid=100 + r, state=telemetry_pb2.RANK_STATE_RUNNING) for r in (0, 1)]
    fake = FakeAgent(info, statuses, interval=0.05)
    fake.push(
        telemetry_pb2.Telemetry(
            step_reports=[
                telemetry_pb2.StepReport(node="node0", rank=r, step=7, loss=2.5, tokens=512, step_seconds=0.25)
                for r in (0, 1)
            ]
        )
    )
    server, address = await serve(fake)
    yield address
    await server.stop(None)


def test_unreachable_agent_exits_1_with_connected_false_and_the_reason() -> None:
    result = run_megascope("status", "--agents", NOBODY, "--json", "--timeout", "3", timeout=60)
    assert result.returncode == 1
    snapshot = json.loads(result.stdout)
    assert snapshot["agents"] == [{"address": NOBODY, "connected": False, "error": snapshot["agents"][0]["error"]}]
    assert "refused: nothing listens" in snapshot["agents"][0]["error"]
    assert "--host" in snapshot["agents"][0]["error"]
    assert f"agent {NOBODY} unreachable" in result.stderr
    assert "Traceback" not in result.stderr


async def test_json_lists_every_rank_of_a_reachable_agent(agent: str) -> None:
    code, stdout, stderr = await status("--agents", agent, "--json")
    assert code == 0, stderr
    snapshot = json.loads(stdout)
    assert snapshot["agents"] == [{"address": agent, "connected": True, "error": None}]
    assert [(r["rank"], r["step"], r["status"]) for r in snapshot["ranks"]] == [(0, 7, "RUNNING"), (1, 7, "RUNNING")]
    assert snapshot["header"]["step"] == 7
    assert snapshot["header"]["tokens_per_second"] == pytest.approx(4096.0)
    assert set(snapshot) == {"agents", "header", "ranks", "nodes", "stragglers", "events"}
    assert snapshot["stragglers"] == []  # two ranks: too few to call one of them slow


async def test_text_output_is_a_table_of_ranks(agent: str) -> None:
    code, stdout, _ = await status("--agents", agent)
    assert code == 0
    lines = stdout.splitlines()
    assert lines[0].startswith("megascope status: step 7")
    rank_lines = [line.split() for line in lines if line[:1].isdigit()]
    assert [(cells[0], cells[2]) for cells in rank_lines] == [("0", "RUNNING"), ("1", "RUNNING")]


async def test_one_unreachable_agent_still_prints_the_others_and_exits_1(agent: str) -> None:
    code, stdout, _ = await status("--agents", f"{agent},{NOBODY}", "--json", "--timeout", "3")
    assert code == 1
    snapshot = json.loads(stdout)
    assert [a["connected"] for a in snapshot["agents"]] == [True, False]
    assert [r["rank"] for r in snapshot["ranks"]] == [0, 1]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--agents", "localhost"], "--agents"),
        (["--agents", "127.0.0.1:99999"], "--agents"),
        (["--agents", "127.0.0.1:50051", "--timeout", "0"], "--timeout"),
    ],
)
def test_bad_arguments_exit_2_naming_the_flag(args: list[str], message: str) -> None:
    result = run_megascope("status", *args, timeout=60)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
