"""An ordinary torchrun DDP script with megascope's two lines, under a real agent: what `megascope status` shows.

The script (tests/support/scripts/api_script.py) is plain PyTorch: gloo, a tiny model, random data, plus
``import megascope.api as megascope``, ``megascope.step(loss=..., tokens=...)`` and the optional
``megascope.comm_hook(model)``. One of its four ranks sleeps every step, as a slow rank would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest
from support import REPO
from support import status_json as status

SCRIPT = REPO / "tests" / "support" / "scripts" / "api_script.py"
STEPS = 60
SLOW_RANK = 3


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """`megascope status --json` of an agent whose 4-rank job (rank 3 sleeping 50 ms a step) has ended."""
    run_dir = tmp_path_factory.mktemp("run")
    agent = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--node", "node0",
         "--nproc-per-node", "4", "--run-dir", str(run_dir), "--", str(SCRIPT),
         "--steps", str(STEPS), "--slow-rank", str(SLOW_RANK), "--slow-seconds", "0.05"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        address = agent.stdout.readline().strip().rsplit(" ", 1)[-1]
        deadline = time.monotonic() + 240
        while True:
            snapshot = status(address)
            kinds = {event["kind"] for event in snapshot["events"]}
            if kinds & {"job_finished", "job_failed"}:
                break
            assert time.monotonic() < deadline and agent.poll() is None, f"the job did not end: {snapshot}"
            time.sleep(1.0)
        yield snapshot
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()


def test_every_rank_reports_its_steps_loss_step_time_and_tokens_per_second(finished_job: dict[str, Any]) -> None:
    ranks = finished_job["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2, 3]
    for rank in ranks:
        assert rank["step"] == STEPS
        assert rank["loss"] > 0 and rank["step_ms"] > 0 and rank["tokens_per_second"] > 0
    assert finished_job["header"]["step"] == STEPS


def test_the_rank_that_sleeps_every_step_is_flagged_as_the_straggler(finished_job: dict[str, Any]) -> None:
    assert [flag["rank"] for flag in finished_job["stragglers"]] == [SLOW_RANK]
    # The others wait for it in the all-reduce that the comm hook times.
    waits = {r["rank"]: r["comm_wait_percent"] for r in finished_job["ranks"]}
    assert all(waits[rank] > waits[SLOW_RANK] for rank in (0, 1, 2))


def test_the_run_finishes_cleanly_with_no_crash_reported(finished_job: dict[str, Any]) -> None:
    kinds = [event["kind"] for event in finished_job["events"]]
    assert "job_finished" in kinds
    assert not {"crash", "rank_lost", "job_failed", "hang"} & set(kinds), kinds
    assert {r["status"] for r in finished_job["ranks"]} == {"EXITED"}
