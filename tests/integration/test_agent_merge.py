"""Checkpoint listing and merges through the agent: real gRPC, real checkpoints, real merge processes.

Most tests run the merge as ``tests/support/merge_stand_in.py`` (the command's contract, with knobs to make it slow,
stubborn or failing); one runs the real ``megascope merge`` on checkpoints of a real training run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from support import read_telemetry, run_megascope
from support.agents import STEPS, serve, write_checkpoints

from megascope.agent import merges
from megascope.agent.merges import MERGE_COMMAND, InfoCache, MergeRunner, list_checkpoints, merged_root, plan_merge
from megascope.agent.server import AgentServer
from megascope.engine.checkpoint import Metadata, committed_steps
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2

RUNNING, DONE = agent_pb2.MERGE_STATE_RUNNING, agent_pb2.MERGE_STATE_DONE
FAILED, CANCELLED = agent_pb2.MERGE_STATE_FAILED, agent_pb2.MERGE_STATE_CANCELLED


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    write_checkpoints(tmp_path / "ckpt")
    return tmp_path / "ckpt"


@pytest.fixture
def stand_in(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The stand-in merge takes 30 s unless a test says otherwise: long enough to act on a running merge."""
    monkeypatch.setenv("STAND_IN_SECONDS", "30")
    yield monkeypatch


@pytest.fixture
async def agent(ckpt_dir: Path) -> AsyncIterator[AgentServer]:
    server = await serve(ckpt_dir)
    try:
        yield server
    finally:
        await runner(server).close()
        await server.stop(0.1)


def runner(server: AgentServer) -> MergeRunner:
    return server.merges


def auth(token: str | None) -> tuple[tuple[str, str], ...] | None:
    return (("authorization", f"Bearer {token}"),) if token else None


async def merge(
    address: str, token: str | None = None, *, until: int | None = None, **fields: Any
) -> list[agent_pb2.MergeProgress]:
    """StartMerge's stream, read to its end (or until a message in state ``until``, then dropped)."""
    seen: list[agent_pb2.MergeProgress] = []
    async with grpc.aio.insecure_channel(address) as channel:
        request = agent_pb2.StartMergeRequest(**fields)
        call = agent_pb2_grpc.AgentServiceStub(channel).StartMerge(request, metadata=auth(token))
        async with asyncio.timeout(120):
            async for response in call:
                progress = response.progress
                seen.append(progress)
                if progress.state == until:
                    call.cancel()
                    break
    return seen


async def unary(address: str, method: str, request: object, token: str | None = None) -> object:
    async with grpc.aio.insecure_channel(address) as channel:
        return await getattr(agent_pb2_grpc.AgentServiceStub(channel), method)(request, metadata=auth(token))


async def status(address: str) -> agent_pb2.MergeProgress:
    response = await unary(address, "GetMergeStatus", agent_pb2.GetMergeStatusRequest())
    return response.progress  # type: ignore[attr-defined, no-any-return]


async def wait_for_state(address: str, *states: int, timeout: float = 60.0) -> agent_pb2.MergeProgress:
    deadline = time.monotonic() + timeout
    while (progress := await status(address)).state not in states:
        assert time.monotonic() < deadline, f"merge still {agent_pb2.MergeState.Name(progress.state)}"
        await asyncio.sleep(0.05)
    return progress


def event_kinds(server: AgentServer) -> list[str]:
    return [e.kind for e in server.state.events if e.kind.startswith("merge_")]


# -- listing -----------------------------------------------------------------------------------------------


async def test_list_checkpoints_gives_each_committed_step_with_its_size_time_world_and_known_val_loss(
    agent: AgentServer, ckpt_dir: Path
) -> None:
    (ckpt_dir / "step_00000050.tmp").mkdir()  # a save in progress is not a checkpoint
    agent.state.add_step(telemetry_pb2.StepReport(rank=0, step=20, val_loss=3.25))
    listing = await unary(agent.address, "ListCheckpoints", agent_pb2.ListCheckpointsRequest())
    assert isinstance(listing, agent_pb2.ListCheckpointsResponse)
    assert listing.directory == str(ckpt_dir.absolute())
    assert [c.step for c in listing.checkpoints] == list(STEPS)
    first = listing.checkpoints[0]
    assert first.path == str(ckpt_dir.absolute() / "step_00000010") and not first.merged
    assert first.world_size == 1 and abs(first.wall_time - time.time()) < 300
    assert first.size_bytes == sum(f.stat().st_size for f in Path(first.path).iterdir())
    assert first.size_bytes > 64 * 64 * 4  # the tensors' bytes at least
    assert [c.val_loss if c.HasField("val_loss") else None for c in listing.checkpoints] == [None, 3.25, None, None]
    assert not listing.merged


async def test_list_checkpoints_of_an_agent_without_a_checkpoint_dir_is_empty() -> None:
    server = await serve(None)
    try:
        listing = await unary(server.address, "ListCheckpoints", agent_pb2.ListCheckpointsRequest())
        assert listing == agent_pb2.ListCheckpointsResponse()
    finally:
        await server.stop(0.1)


def test_listing_again_reads_only_the_checkpoints_it_has_not_read(
    ckpt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    read: list[Path] = []
    real = merges.read_metadata

    def counted(step_dir: Path) -> Metadata:
        read.append(step_dir)
        return real(step_dir)

    monkeypatch.setattr(merges, "read_metadata", counted)
    cache: InfoCache = {}
    first = list_checkpoints(ckpt_dir, {20: 3.0}, {}, cache)
    write_checkpoints(ckpt_dir, (50,))
    second = list_checkpoints(ckpt_dir, {}, {}, cache)
    assert [d.name for d in read] == [f"step_{s:08d}" for s in (*STEPS, 50)]
    assert [c.step for c in second.checkpoints] == [*STEPS, 50]
    assert first.checkpoints[1].val_loss == 3.0 and not second.checkpoints[1].HasField("val_loss")


# -- merging -----------------------------------------------------------------------------------------------


async def test_merge_streams_progress_then_done_and_is_listed_beside_the_run_with_its_val_loss(
    agent: AgentServer, ckpt_dir: Path
) -> None:
    seen = await merge(agent.address, method="sma", last=3, eval=True)
    assert [p.state for p in seen[:-1]] == [RUNNING] * (len(seen) - 1) and seen[-1].state == DONE
    assert any(p.tensors_total == 10 and 0 < p.tensors_done < 10 for p in seen)  # progress on the way
    done = seen[-1]
    assert list(done.steps) == [20, 30, 40] and done.method == "sma"
    out = Path(done.out)
    assert out.parent == merged_root(ckpt_dir.absolute()) and out.name.startswith("merge-sma-20-40-")
    assert committed_steps(out) == [40]
    assert done.val_loss == 2.9 and dict(done.input_val_losses) == {40: 3.0, 30: 3.01, 20: 3.02}

    listing = await unary(agent.address, "ListCheckpoints", agent_pb2.ListCheckpointsRequest())
    assert isinstance(listing, agent_pb2.ListCheckpointsResponse)
    assert [(m.path, m.merged, m.val_loss) for m in listing.merged] == [(str(out), True, 2.9)]
    assert [c.step for c in listing.checkpoints] == list(STEPS)  # the run's own directory is untouched
    assert {c.step: c.val_loss for c in listing.checkpoints if c.HasField("val_loss")} == {20: 3.02, 30: 3.01, 40: 3.0}
    assert event_kinds(agent) == ["merge_started", "merge_done"]
    detail = agent.state.events[-1].merge
    assert detail.val_loss == 2.9 and dict(detail.input_val_losses) == {20: 3.02, 30: 3.01, 40: 3.0}


async def test_second_merge_while_one_runs_is_refused_naming_the_running_one(
    agent: AgentServer, stand_in: pytest.MonkeyPatch
) -> None:
    await merge(agent.address, method="sma", steps=[10, 20], until=RUNNING)
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await merge(agent.address, method="ema", last=2)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already running (sma of steps 10, 20" in (raised.value.details() or "")
    assert event_kinds(agent) == ["merge_started"]


async def test_cancel_merge_stops_it_and_publishes_nothing(agent: AgentServer, stand_in: pytest.MonkeyPatch) -> None:
    running = (await merge(agent.address, method="wma", last=4, until=RUNNING))[-1]
    await wait_for_state_message(agent.address, "merging")  # the process is up and working
    pid = runner(agent)._run.process.pid  # type: ignore[union-attr]
    answer = await unary(agent.address, "CancelMerge", agent_pb2.CancelMergeRequest())
    assert answer == agent_pb2.CancelMergeResponse(cancelled=True)
    ended = await wait_for_state(agent.address, CANCELLED, FAILED, DONE, timeout=10)
    assert ended.state == CANCELLED
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not Path(running.out).exists() and not list(Path(running.out).parent.iterdir())
    assert event_kinds(agent) == ["merge_started", "merge_cancelled"]
    again = await unary(agent.address, "CancelMerge", agent_pb2.CancelMergeRequest())
    assert again == agent_pb2.CancelMergeResponse(cancelled=False)  # nothing runs any more


async def wait_for_state_message(address: str, prefix: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not (await status(address)).message.startswith(prefix):
        assert time.monotonic() < deadline, f"no {prefix!r} status"
        await asyncio.sleep(0.05)


async def test_merge_that_ignores_sigterm_is_killed_after_the_grace(
    ckpt_dir: Path, stand_in: pytest.MonkeyPatch
) -> None:
    stand_in.setenv("STAND_IN_IGNORE_SIGTERM", "1")
    server = await serve(ckpt_dir, grace=0.5)
    try:
        await merge(server.address, method="sma", last=2, until=RUNNING)
        await wait_for_state_message(server.address, "merging")
        started = time.monotonic()
        await unary(server.address, "CancelMerge", agent_pb2.CancelMergeRequest())
        ended = await wait_for_state(server.address, CANCELLED, FAILED, DONE, timeout=10)
        assert ended.state == CANCELLED and time.monotonic() - started < 5
        assert not list(merged_root(ckpt_dir.absolute()).iterdir())  # the stand-in's staging directory too
    finally:
        await server.stop(0.1)


async def test_merge_runs_at_the_lowest_cpu_priority(agent: AgentServer, stand_in: pytest.MonkeyPatch) -> None:
    await merge(agent.address, method="sma", last=2, until=RUNNING)
    await wait_for_state_message(agent.address, "merging")
    process = runner(agent)._run.process  # type: ignore[union-attr]
    assert process is not None and psutil.Process(process.pid).nice() == 19


async def test_a_dropped_stream_leaves_the_merge_running_and_its_end_is_in_get_merge_status(
    agent: AgentServer,
) -> None:
    await merge(agent.address, method="sma", last=2, until=RUNNING)  # the client goes away at once
    ended = await wait_for_state(agent.address, DONE, FAILED, CANCELLED)
    assert ended.state == DONE and Path(ended.out).is_dir()


async def test_get_merge_status_before_any_merge_is_unspecified(agent: AgentServer) -> None:
    assert await status(agent.address) == agent_pb2.MergeProgress()


async def test_failing_merge_ends_failed_with_the_commands_own_error(
    agent: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_FAIL", "step_00000020: damaged metadata")
    seen = await merge(agent.address, method="sma", last=2)
    assert seen[-1].state == FAILED and seen[-1].message == "step_00000020: damaged metadata"
    assert event_kinds(agent) == ["merge_started", "merge_failed"]
    assert "damaged metadata" in agent.state.events[-1].text


async def test_merge_whose_output_cannot_be_read_fails_and_the_next_one_can_start(
    agent: AgentServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("STAND_IN_GARBAGE_BYTES", str(4 << 20))  # one "line" beyond what the agent reads
    seen = await merge(agent.address, method="sma", last=2)
    assert seen[-1].state == FAILED and "the agent lost the merge" in seen[-1].message
    monkeypatch.delenv("STAND_IN_GARBAGE_BYTES")
    assert (await merge(agent.address, method="sma", last=2))[-1].state == DONE


@pytest.mark.parametrize(
    ("fields", "code", "says"),
    [
        ({"method": "median", "last": 2}, grpc.StatusCode.INVALID_ARGUMENT, "method: must be one of sma, wma, ema"),
        ({"method": "sma", "steps": [10]}, grpc.StatusCode.INVALID_ARGUMENT, "at least 2 checkpoints, got 1"),
        ({"method": "sma"}, grpc.StatusCode.INVALID_ARGUMENT, "steps or last"),
        ({"method": "ema", "alpha": 1.5, "last": 2}, grpc.StatusCode.INVALID_ARGUMENT, "alpha: must be in (0, 1]"),
        ({"method": "sma", "alpha": 0.5, "last": 2}, grpc.StatusCode.INVALID_ARGUMENT, "only ema takes an alpha"),
        ({"method": "sma", "steps": [10, 25]}, grpc.StatusCode.NOT_FOUND, "no committed checkpoint for step 25"),
        ({"method": "sma", "steps": [10, 20], "last": 2}, grpc.StatusCode.INVALID_ARGUMENT, "not both"),
        ({"method": "sma", "steps": [10, 10]}, grpc.StatusCode.INVALID_ARGUMENT, "10 listed more than once"),
        ({"steps": [10, 20], "weights": [0.5, 0.4]}, grpc.StatusCode.INVALID_ARGUMENT, "--weights must sum to 1"),
        ({"last": 2, "weights": [1.0]}, grpc.StatusCode.INVALID_ARGUMENT, "--weights gives 1 weights for 2"),
        ({"method": "wma", "last": 2, "weights": [0.5, 0.5]}, grpc.StatusCode.INVALID_ARGUMENT,
         "explicit weights replace the method"),
        ({"method": "sma", "every": 10}, grpc.StatusCode.INVALID_ARGUMENT, "every: only applies with last"),
        ({"method": "sma", "last": 5}, grpc.StatusCode.FAILED_PRECONDITION, "has 4 committed checkpoint(s)"),
        ({"method": "sma", "last": 3, "every": 20}, grpc.StatusCode.FAILED_PRECONDITION,
         "no committed checkpoint for step 0"),
    ],
    ids=["unknown-method", "one-input", "no-inputs", "alpha-range", "alpha-not-ema", "missing-step", "steps-and-last",
         "repeated-step", "weights-sum", "weights-count", "weights-and-method", "every-alone", "too-few-committed",
         "too-few-spaced"],
)  # fmt: skip
async def test_bad_merge_request_is_refused_before_anything_starts(
    agent: AgentServer, fields: dict[str, Any], code: grpc.StatusCode, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await merge(agent.address, **fields)
    assert raised.value.code() == code
    assert says in (raised.value.details() or "")
    assert event_kinds(agent) == [] and runner(agent)._run is None


async def test_merge_on_an_agent_whose_run_saves_no_checkpoints_is_a_failed_precondition() -> None:
    server = await serve(None)
    try:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await merge(server.address, method="sma", last=2)
        assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "--ckpt-dir" in (raised.value.details() or "")
    finally:
        await server.stop(0.1)


@pytest.mark.parametrize(
    ("token", "code"),
    [(None, grpc.StatusCode.UNAUTHENTICATED), ("wrong", grpc.StatusCode.PERMISSION_DENIED)],
    ids=["no-token", "wrong-token"],
)
async def test_merge_control_rpcs_need_the_agents_token_and_reads_do_not(
    ckpt_dir: Path, token: str | None, code: grpc.StatusCode
) -> None:
    server = await serve(ckpt_dir, token="secret")
    try:
        with pytest.raises(grpc.aio.AioRpcError) as start:
            await merge(server.address, token, method="sma", last=2)
        with pytest.raises(grpc.aio.AioRpcError) as cancel:
            await unary(server.address, "CancelMerge", agent_pb2.CancelMergeRequest(), token)
        assert start.value.code() == code and cancel.value.code() == code
        assert runner(server)._run is None
        listing = await unary(server.address, "ListCheckpoints", agent_pb2.ListCheckpointsRequest())
        assert len(listing.checkpoints) == len(STEPS)  # type: ignore[attr-defined]
        seen = await merge(server.address, "secret", method="sma", last=2)
        assert seen[-1].state == DONE
    finally:
        await server.stop(0.1)


# -- the real merge command on a real run ------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny run with checkpoints and validation at steps 8, 16 and 24."""
    root = tmp_path_factory.mktemp("trained")
    result = run_megascope(
        "train", "--preset", "tiny", "--batch-tokens", "256", "--val-batches", "2", "--steps", "24",
        "--warmup-steps", "4", "--log-every", "100", "--ckpt-dir", str(root / "ckpt"), "--ckpt-every", "8",
        "--ckpt-keep", "0", "--val-every", "8", "--run-dir", str(root / "run"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    return root


async def test_real_merge_publishes_a_checkpoint_beside_the_run_with_the_validation_losses_of_all(
    trained: Path,
) -> None:
    server = await serve(trained / "ckpt", command=list(MERGE_COMMAND))
    try:
        seen = await merge(server.address, method="ema", alpha=0.5, last=3, eval=True)
        listing = await unary(server.address, "ListCheckpoints", agent_pb2.ListCheckpointsRequest())
    finally:
        await server.stop(0.1)
    done = seen[-1]
    assert done.state == DONE, done.message
    assert any(p.state == RUNNING and p.tensors_total > 0 and p.bytes_total > 0 for p in seen)
    out = Path(done.out)
    assert out.parent == trained / "ckpt-merged" and committed_steps(out) == [24]
    logged = {r["step"]: r["val_loss"] for r in read_telemetry(trained / "run")[0] if r.get("val_loss") is not None}
    assert dict(done.input_val_losses) == {step: pytest.approx(logged[step], rel=1e-5) for step in (8, 16, 24)}
    assert math.isfinite(done.val_loss) and done.val_loss > 0
    assert isinstance(listing, agent_pb2.ListCheckpointsResponse)
    assert [(m.path, m.step, m.val_loss) for m in listing.merged] == [(str(out), 24, done.val_loss)]
    assert [c.step for c in listing.checkpoints] == [8, 16, 24]


# -- choosing the inputs (no processes) ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("last", "every", "expected"),
    [(2, 0, (30, 40)), (4, 0, (10, 20, 30, 40)), (2, 20, (20, 40)), (3, 10, (20, 30, 40))],
)
def test_last_n_every_v_counts_back_from_the_newest_checkpoint(
    ckpt_dir: Path, last: int, every: int, expected: tuple[int, ...]
) -> None:
    plan = plan_merge(agent_pb2.StartMergeRequest(method="sma", last=last, every=every), ckpt_dir, now=0)
    assert plan.steps == expected


def test_merge_goes_beside_the_checkpoint_dir_with_a_new_name_each_time(ckpt_dir: Path) -> None:
    request = agent_pb2.StartMergeRequest(steps=[40, 10], weights=[0.25, 0.75])
    plan = plan_merge(request, ckpt_dir, now=0)
    assert plan.steps == (10, 40) and plan.weights == (0.25, 0.75) and plan.method == "weights"  # oldest first
    assert plan.out.parent == ckpt_dir.parent / "ckpt-merged" and plan.out.name.startswith("merge-weights-10-40-")
    plan.out.mkdir(parents=True)
    assert plan_merge(request, ckpt_dir, now=0).out.name == plan.out.name + "-2"
