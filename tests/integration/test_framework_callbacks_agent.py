"""A Hugging Face ``Trainer`` script with ``MegascopeCallback``, run by a real agent on two DDP ranks (gloo): what
``megascope status --json`` shows, and a checkpoint asked for through the agent saved by the Trainer itself.

The script (tests/support/scripts/hf_script.py) trains a 1-layer GPT-2 built from a config on random ids; its only
megascope line is ``callbacks=[MegascopeCallback()]``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from support import REPO
from support import status_json as status

from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc

pytest.importorskip("transformers")

SCRIPT = REPO / "tests" / "support" / "scripts" / "hf_script.py"
STEPS = 300
SAVE_AHEAD = 100
"""Steps between the newest step seen and the one the checkpoint is asked for: ~6 s of margin at ~60 ms a step."""


def ended(snapshot: dict[str, Any]) -> bool:
    return bool({event["kind"] for event in snapshot["events"]} & {"job_finished", "job_failed"})


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The job's last ``megascope status --json``, the checkpoint the agent answered for, and the output folder."""
    out = tmp_path_factory.mktemp("hf")
    agent = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--node", "node0",
         "--nproc-per-node", "2", "--run-dir", str(out / "run"), "--", str(SCRIPT), str(out / "trainer"),
         "--steps", str(STEPS), "--logging-steps", "50"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        address = agent.stdout.readline().strip().rsplit(" ", 1)[-1]
        deadline = time.monotonic() + 300
        saved: agent_pb2.SaveCheckpointResponse | None = None
        while True:
            snapshot = status(address)
            step = snapshot["header"]["step"]
            if saved is None and step:
                with grpc.insecure_channel(address) as channel:
                    saved = agent_pb2_grpc.AgentServiceStub(channel).SaveCheckpoint(
                        agent_pb2.SaveCheckpointRequest(step=step + SAVE_AHEAD), timeout=60
                    )
            if ended(snapshot):
                break
            assert time.monotonic() < deadline and agent.poll() is None, f"the job did not end: {snapshot}"
            time.sleep(0.5)
        yield {"status": snapshot, "saved": saved, "out": out}
    finally:
        agent.terminate()
        try:
            agent.wait(timeout=30)
        except subprocess.TimeoutExpired:
            agent.kill()


def test_both_ranks_report_every_step_with_loss_step_time_tokens_and_data_wait(job: dict[str, Any]) -> None:
    ranks = job["status"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    for rank in ranks:
        assert rank["step"] == STEPS
        assert 0 < rank["loss"] < 10  # ln(64) = 4.2 for a random model over 64 ids
        assert rank["step_ms"] > 0 and rank["tokens_per_second"] > 0
        assert rank["data_wait_percent"] is not None
    assert job["status"]["header"]["step"] == STEPS


def test_a_checkpoint_asked_for_through_the_agent_is_saved_by_the_trainer_at_that_step(job: dict[str, Any]) -> None:
    saved = job["saved"]
    assert saved is not None and saved.ranks == 2
    assert (Path(job["out"]) / "trainer" / f"checkpoint-{saved.step}" / "trainer_state.json").exists()


def test_the_run_ends_as_finished_with_no_crash_reported(job: dict[str, Any]) -> None:
    kinds = [event["kind"] for event in job["status"]["events"]]
    assert "job_finished" in kinds
    assert not {"crash", "rank_lost", "job_failed", "hang"} & set(kinds), kinds
    assert {r["status"] for r in job["status"]["ranks"]} == {"EXITED"}
