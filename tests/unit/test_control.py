"""Job control (agent/control.py) on its own: commands to the ranks' queues, acks by id, refusals; no gRPC, no
process of its own."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import torch

from megascope.agent.control import JobControl, NoSuchCheckpoint, Refused
from megascope.agent.state import NodeState
from megascope.agent.supervision import Supervisor
from megascope.engine.checkpoint import Checkpointer
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2


def node(run_dir: Path | None = None, ckpt_dir: Path | None = None) -> tuple[NodeState, JobControl]:
    state = NodeState(telemetry_pb2.NodeInfo(node="node0"))
    control = JobControl(
        state, Supervisor(state), str(run_dir) if run_dir else None, str(ckpt_dir) if ckpt_dir else None, 0.5
    )
    return state, control


def attach(state: NodeState, control: JobControl, rank: int, step: int) -> asyncio.Queue[worker_pb2.Command]:
    """A rank that attached (pid 10 + rank, not a child of this process) and reported ``step``."""
    state.rank_attached(worker_pb2.Hello(rank=rank, world_size=2, pid=10 + rank))
    state.add_step(telemetry_pb2.StepReport(rank=rank, step=step))
    return control.open_channel(rank)


def ack(control: JobControl, rank: int, command: worker_pb2.Command, ok: bool = True, message: str = "") -> None:
    control.acknowledged(rank, worker_pb2.CommandAck(command_id=command.id, ok=ok, message=message))


async def test_a_save_goes_to_every_rank_with_one_step_past_the_newest_and_waits_for_their_acks() -> None:
    state, control = node()
    queues = [attach(state, control, 0, 10), attach(state, control, 1, 11)]
    save = asyncio.ensure_future(control.save_checkpoint())
    await asyncio.sleep(0)
    commands = [q.get_nowait() for q in queues]
    assert commands[0] == commands[1] and commands[0].kind == worker_pb2.COMMAND_KIND_CHECKPOINT
    assert commands[0].step == 14 and commands[0].id
    for rank in (0, 1):
        ack(control, rank, commands[0], message="will save after step 14")
    sent = await asyncio.wait_for(save, 0.2)  # answered: no waiting out the ack timeout
    assert (sent.step, sent.ranks, sent.command_id) == (14, 2, commands[0].id)
    [requested] = state.events
    assert requested.kind == "checkpoint_requested" and requested.checkpoint.step == 14


async def test_a_refusal_names_the_rank_and_why() -> None:
    state, control = node()
    queue = attach(state, control, 0, 3)
    save = asyncio.ensure_future(control.save_checkpoint(20))
    await asyncio.sleep(0)
    ack(control, 0, queue.get_nowait(), ok=False, message="this run saves no checkpoints")
    with pytest.raises(Refused, match="rank 0: this run saves no checkpoints"):
        await save


async def test_a_rank_that_never_answers_costs_the_ack_wait_and_one_that_leaves_costs_nothing() -> None:
    state, control = node()
    silent = attach(state, control, 0, 3)
    sent = await control.stop()
    assert sent.step == 4 and control.command(sent.command_id) is not None  # answered by nobody, after 0.5 s
    assert silent.get_nowait().kind == worker_pb2.COMMAND_KIND_STOP
    stop = asyncio.ensure_future(control.stop(9))
    await asyncio.sleep(0)
    control.close_channel(0, silent)
    assert (await asyncio.wait_for(stop, 0.2)).ranks == 1


async def test_an_ack_for_an_unknown_command_or_from_another_rank_is_dropped() -> None:
    state, control = node()
    queue = attach(state, control, 0, 3)
    save = asyncio.ensure_future(control.save_checkpoint())
    await asyncio.sleep(0)
    command = queue.get_nowait()
    control.acknowledged(0, worker_pb2.CommandAck(command_id="made-up", ok=False))
    ack(control, 1, command, ok=False)
    await save  # neither refusal counted
    pending = control.command(command.id)
    assert pending is not None and pending.acks == {}


async def test_commands_need_attached_ranks_and_a_step_still_to_come() -> None:
    state, control = node()
    with pytest.raises(Refused, match="no training rank is attached"):
        await control.save_checkpoint()
    attach(state, control, 0, 30)
    with pytest.raises(Refused, match="30 is already done"):
        await control.save_checkpoint(30)


async def test_a_restart_needs_checkpoints_a_committed_step_and_running_ranks(tmp_path: Path) -> None:
    _, control = node()
    with pytest.raises(Refused, match="no --ckpt-dir"):
        await control.restart(4)
    ckpt = tmp_path / "ckpt"
    checkpointer = Checkpointer(ckpt, keep_last=0)
    for step in (2, 4):
        checkpointer.save(step, {"w": torch.zeros(2)}, extra={"step": step})
        checkpointer.wait()
    checkpointer.close()
    state, control = node(tmp_path, ckpt)
    with pytest.raises(NoSuchCheckpoint, match=r"no committed checkpoint at step 3 .*\(committed: 2, 4\)"):
        await control.restart(3)
    with pytest.raises(Refused, match="no training rank is running"):
        await control.restart(2)
    attach(state, control, 0, 5)
    started = await control.restart(2, "from a test")
    assert started.step == 2 and started.ranks_stopped == 0  # pid 10 is not this agent's child: never signalled
    assert json.loads(run_paths.restart_request_file(tmp_path).read_text()) == {"step": 2}
    [requested] = [e for e in state.events if e.kind == "restart_requested"]
    assert requested.restart.from_step == 2 and "from a test; resuming from step 2" in requested.text
    assert (await control.restart(0)).step == 4  # 0: the newest
