"""Crashes, hangs, lost nodes and restart storms, end to end: real agents, torchrun, ranks, signals and checkpoints.

Each test runs ``megascope demo --headless --json`` (or a bare agent) on the tiny model with short timeouts and
reads what a user would: the JSON summary's events, the ranks' telemetry files, the exit codes.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from support import REPO, read_telemetry

from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.engine.checkpoint.checkpointer import CRASH_POINT_ENV
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2

pytestmark = pytest.mark.timeout(600)

SMALL_JOB = ["--steps", "12", "--ckpt-every", "4", "--batch-tokens", "512"]


def demo(tmp_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 400) -> dict[str, Any]:
    """The headless demo's JSON summary (it also carries the exit code as ``returncode``)."""
    result = subprocess.run(
        [sys.executable, "-m", "megascope.agent.cli", "demo", "--headless", "--json", "--run-dir", str(tmp_path),
         *args],
        capture_output=True, text=True, timeout=timeout, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
    )  # fmt: skip
    lines = result.stdout.strip().splitlines()
    assert lines and lines[-1].startswith("{"), f"no summary; stderr: {result.stderr[-3000:]}"
    summary: dict[str, Any] = json.loads(lines[-1])
    summary["returncode"] = result.returncode
    return summary


def events(summary: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    return [e for e in summary["events"] if e["kind"] == kind]


def losses(run_dir: Path, rank: int = 0) -> dict[tuple[int, int], float]:
    """Loss by (restart count, step) from the rank's telemetry."""
    return {
        (r.get("restart_count", 0), r["step"]): r["loss"]
        for r in read_telemetry(run_dir)[rank]
        if r.get("type") == "step"
    }


def test_a_crashed_rank_is_replaced_in_place_and_training_goes_on_as_if_uninterrupted(tmp_path: Path) -> None:
    crashed = demo(tmp_path / "crashed", "--nodes", "1", "--inject", "crash:rank=1,step=7", *SMALL_JOB)
    assert crashed["returncode"] == 0 and crashed["steps"] == 12
    [crash] = events(crashed, "crash")
    # The newest step the agent had heard of: step 6's report may still be on its way when the crash is named.
    assert crash["rank"] == 1 and crash["step"] in (5, 6) and "killed by SIGKILL" in crash["text"]
    [restart] = events(crashed, "restart")
    assert "job recovered in place after the crash: went on from step 6" in restart["text"], restart["text"]
    [recovered] = events(crashed, "recovered")
    assert recovered["attributes"]["replaced_ranks"] == [1] and recovered["step"] == 6, recovered
    assert not events(crashed, "resumed")  # the state came from a surviving rank, not from a checkpoint

    clean = demo(tmp_path / "clean", "--nodes", "1", *SMALL_JOB)
    assert clean["returncode"] == 0
    after = {step: loss for (attempt, step), loss in losses(tmp_path / "crashed").items() if step >= 7}
    assert sorted(after) == list(range(7, 13)) and {attempt for attempt, _ in losses(tmp_path / "crashed")} == {0}
    uninterrupted = {step: loss for (_, step), loss in losses(tmp_path / "clean").items()}
    assert after == {step: uninterrupted[step] for step in after}  # bit for bit: the recovery loses nothing


def test_a_crashed_rank_is_named_with_its_signal_and_training_resumes_as_if_uninterrupted(tmp_path: Path) -> None:
    crashed = demo(
        tmp_path / "crashed", "--nodes", "1", "--recovery", "restart", "--inject", "crash:rank=1,step=7", *SMALL_JOB
    )
    assert crashed["returncode"] == 0 and crashed["steps"] == 12
    [crash] = events(crashed, "crash")
    # The newest step the agent had heard of: step 6's report may still be on its way when the crash is named.
    assert crash["rank"] == 1 and crash["step"] in (5, 6) and "killed by SIGKILL" in crash["text"]
    [restart] = events(crashed, "restart")
    assert "resumed from step 4" in restart["text"] and crashed["restarts"] == 1

    clean = demo(tmp_path / "clean", "--nodes", "1", *SMALL_JOB)
    assert clean["returncode"] == 0
    after = {step: loss for (attempt, step), loss in losses(tmp_path / "crashed").items() if attempt == 1}
    assert sorted(after) == list(range(5, 13))
    uninterrupted = {step: loss for (_, step), loss in losses(tmp_path / "clean").items()}
    assert after == {step: uninterrupted[step] for step in after}  # bit for bit: the resume loses nothing


def test_a_rank_that_raises_is_named_with_its_exit_code_and_traceback(tmp_path: Path) -> None:
    summary = demo(tmp_path, "--nodes", "1", "--inject", "crash:rank=1,step=4,how=exception", "--steps", "6",
                   "--ckpt-every", "2", "--batch-tokens", "256")  # fmt: skip
    assert summary["returncode"] == 0 and summary["steps"] == 6
    [crash] = events(summary, "crash")
    assert crash["rank"] == 1 and "exited with code 1" in crash["text"]
    assert "RuntimeError: injected fault crash:rank=1,step=4" in "\n".join(crash["attributes"]["log_tail"])


def test_a_fault_that_fired_is_not_announced_again_after_the_restart(tmp_path: Path) -> None:
    summary = demo(tmp_path, "--nodes", "1", "--inject", "crash:rank=1,step=4,how=exit", "--steps", "6",
                   "--ckpt-every", "2", "--batch-tokens", "256")  # fmt: skip
    assert summary["restarts"] == 1
    assert [e["rank"] for e in events(summary, "fault_injected")] == [1]


FOUR_RANKS = ["--nodes", "1", "--ranks-per-node", "4", "--steps", "8", "--ckpt-every", "3", "--batch-tokens", "256"]


def final_digests(run_dir: Path) -> set[str]:
    """The parameter digest every rank reported when it finished (one value when all ranks hold the same weights)."""
    digests = set()
    for path in (run_dir / "telemetry").glob("rank*.jsonl"):
        for line in path.read_text().splitlines():
            if '"type": "finished"' in line:  # not json.loads on every line: a killed rank may have left half a one
                digests.add(json.loads(line)["param_digest"])
    return digests


@pytest.fixture(scope="module")
def uninterrupted_digest(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The weights of the four-rank job trained without a fault."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    assert demo(run_dir, *FOUR_RANKS)["returncode"] == 0
    [digest] = final_digests(run_dir)
    return digest


@pytest.mark.parametrize("rank", [0, 1, 2, 3])
def test_a_crash_of_any_rank_is_recovered_in_place_to_the_uninterrupted_weights(
    tmp_path: Path, rank: int, uninterrupted_digest: str
) -> None:
    summary = demo(tmp_path, *FOUR_RANKS, "--inject", f"crash:rank={rank},step=5")
    assert summary["returncode"] == 0 and summary["steps"] == 8 and summary["restarts"] == 1
    [recovered] = events(summary, "recovered")
    assert recovered["attributes"]["replaced_ranks"] == [rank]
    assert final_digests(tmp_path) == {uninterrupted_digest}  # bit for bit, on every rank


@pytest.mark.parametrize("culprit", [0, 1, 2, 3])
def test_a_hung_rank_is_named_from_all_ranks_stacks_and_replaced_in_place(
    tmp_path: Path, culprit: int, uninterrupted_digest: str
) -> None:
    timeout = 4.0
    summary = demo(tmp_path, *FOUR_RANKS, "--hang-timeout", str(timeout), "--inject", f"hang:rank={culprit},step=6")
    assert summary["returncode"] == 0 and summary["steps"] == 8
    [hang] = events(summary, "hang")
    assert hang["rank"] == culprit, hang["text"]
    assert "stacks of 4/4 ranks collected" in hang["text"] and f"replacing rank {culprit}" in hang["text"]
    assert float(hang["attributes"]["detect_seconds"]) <= timeout + 10
    assert len(events(summary, "restart")) == 1
    [recovered] = events(summary, "recovered")
    assert recovered["attributes"]["replaced_ranks"] == [culprit]
    assert final_digests(tmp_path) == {uninterrupted_digest}


def test_a_stopped_rank_is_named_although_it_cannot_answer_for_its_stacks(tmp_path: Path) -> None:
    summary = demo(
        tmp_path, "--nodes", "1", "--ranks-per-node", "2", "--hang-timeout", "4",
        "--inject", "hang:rank=1,step=6,how=stop", "--steps", "8", "--ckpt-every", "3", "--batch-tokens", "256",
    )  # fmt: skip
    assert summary["returncode"] == 0 and summary["steps"] == 8
    [hang] = events(summary, "hang")
    assert hang["rank"] == 1 and "stopped (SIGSTOP)" in hang["text"]  # read from outside with py-spy, or not at all


def test_a_crash_in_the_middle_of_a_save_resumes_from_the_previous_complete_checkpoint(tmp_path: Path) -> None:
    # Rank 0 is killed while committing step 8's checkpoint: step 8 must not count, step 4 is the last whole one.
    summary = demo(tmp_path, "--nodes", "1", "--recovery", "restart", *SMALL_JOB, env={CRASH_POINT_ENV: "commit:0:8"})
    assert summary["returncode"] == 0 and summary["steps"] == 12
    assert [e["rank"] for e in events(summary, "crash")] == [0]
    resumed = {e["step"] for e in events(summary, "resumed")}
    assert resumed == {4}


def test_a_rank_that_crashes_at_every_start_exhausts_the_restarts_and_the_job_ends_clearly(tmp_path: Path) -> None:
    summary = demo(
        tmp_path, "--nodes", "1", "--max-restarts", "2", "--inject", "crash:rank=0,step=2,times=0",
        "--steps", "10", "--batch-tokens", "256",
    )  # fmt: skip
    assert summary["returncode"] != 0
    assert len(events(summary, "crash")) == 3  # the first start and both restarts
    [failed] = events(summary, "job_failed")
    assert "gave up" in failed["text"] and "--max-restarts 2" in failed["text"]


def test_when_an_agent_dies_its_node_is_lost_and_the_other_node_trains_on(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "megascope.agent.cli", "demo", "--headless", "--json", "--run-dir", str(tmp_path),
        "--nodes", "2", "--ranks-per-node", "1", "--min-nodes", "1", "--steps", "30", "--ckpt-every", "5",
        "--batch-tokens", "256",
    ]  # fmt: skip
    demo_process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        node1 = _wait_for_agent_of(demo_process.pid, "node1")
        _wait_for_step(tmp_path, rank=1, step=8)
        node1.send_signal(signal.SIGKILL)  # the whole node goes: its torchrun and rank follow their agent
        stdout, stderr = demo_process.communicate(timeout=400)
    finally:
        if demo_process.poll() is None:
            demo_process.kill()
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["agent_exit_codes"][0] == 0, stderr[-3000:]
    lost = [e for e in summary["events"] if e["node"] == "node1" and e["kind"] in ("node_lost", "disconnected")]
    assert lost, "the dashboard never marked node1"
    steps = [r["step"] for r in read_telemetry(tmp_path)[0] if r.get("type") == "step"]
    assert max(steps) == 30  # rank 0 did not hang on its vanished peer: it restarted alone and finished


def _wait_for_agent_of(demo_pid: int, node: str, timeout: float = 60) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(demo_pid).children(recursive=True):
            try:
                cmdline = child.cmdline()
            except psutil.Error:
                continue
            if "agent" in cmdline and node in cmdline and "torch.distributed.run" not in " ".join(cmdline):
                return child
        time.sleep(0.2)
    raise AssertionError(f"no agent for {node} appeared")


def _wait_for_step(run_dir: Path, rank: int, step: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    path = run_dir / "telemetry" / f"rank{rank}.jsonl"
    while time.monotonic() < deadline:
        if path.exists() and f'"step": {step},' in path.read_text():
            return
        time.sleep(0.3)
    raise AssertionError(f"rank {rank} never reached step {step}")


async def test_a_restart_from_a_checkpoint_that_does_not_exist_is_refused_naming_the_step(tmp_path: Path) -> None:
    (tmp_path / "ckpt").mkdir()
    server = AgentServer(NodeState(telemetry_pb2.NodeInfo(node="node0")), ckpt_dir=str(tmp_path / "ckpt"))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await agent_pb2_grpc.AgentServiceStub(channel).Restart(agent_pb2.RestartRequest(step=999))
    finally:
        await server.stop(grace_seconds=0.5)
    assert error.value.code() == grpc.StatusCode.NOT_FOUND
    assert "no committed checkpoint at step 999" in (error.value.details() or "")


def test_a_restart_asked_for_over_grpc_resumes_from_the_step_asked(tmp_path: Path) -> None:
    agent = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--node", "node0", "--run-dir",
         str(tmp_path), "--ckpt-dir", str(tmp_path / "ckpt"), "--ckpt-every", "2", "--ckpt-keep", "0", "--steps",
         "40", "--batch-tokens", "256", "--max-restarts", "1", "--exit-when-done"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO,
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        address = agent.stdout.readline().strip().rsplit(" ", 1)[-1]
        _wait_for_step(tmp_path, rank=0, step=9)
        response = asyncio.run(_restart(address, step=4))
        assert response.step == 4 and response.ranks_stopped == 1
        assert agent.wait(timeout=300) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
    records = read_telemetry(tmp_path)[0]
    resumed = [r for r in records if r.get("type") == "event" and r["kind"] == "resumed"]
    assert [r["step"] for r in resumed] == [4]


async def _restart(address: str, step: int) -> agent_pb2.RestartResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        response: agent_pb2.RestartResponse = await agent_pb2_grpc.AgentServiceStub(channel).Restart(
            agent_pb2.RestartRequest(step=step, reason="test")
        )
        return response


def test_a_node_whose_self_check_is_far_below_the_others_is_evicted_and_the_job_goes_on(tmp_path: Path) -> None:
    summary = demo(
        tmp_path, "--nodes", "2", "--ranks-per-node", "1", "--min-nodes", "1", "--evict-slow-nodes",
        "--inject", "slow:rank=1,factor=5", "--steps", "12", "--batch-tokens", "256",
    )  # fmt: skip
    assert summary["agent_exit_codes"] == [0, 0]
    checks = {e["node"]: e for e in events(summary, "self_check") if e["step"] == 0}
    assert "SLOW: matmul_gflops" in checks["node1"]["text"]
    assert [e["node"] for e in events(summary, "node_evicted")] == ["node1"]
    steps = [r["step"] for r in read_telemetry(tmp_path)[0] if r.get("type") == "step"]
    assert max(steps) == 12
