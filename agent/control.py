"""Job control: the one object through which anything changes what this node's ranks do.

:class:`JobControl` owns the four commands. The gRPC servicers (agent/server.py) only validate a request, call
it, and map its errors to status codes; the agent itself calls it to stop the ranks on shutdown. Each command
takes the one route that still works when the command is needed, and this is the one place that says which:

- save checkpoint: ``Command{id, CHECKPOINT, step}`` down each live rank's Attach stream; each rank answers with
  a ``CommandAck`` carrying the id, collected here by id (a refusal fails the call). Why the stream: a rank saves
  at a step boundary, which only a live, stepping rank reaches, and every rank must save the same step, so the
  agent names it.
- stop: ``Command{id, STOP, step}`` down each Attach stream, acks collected the same way. Why the stream: a clean
  finish (last telemetry, the rank's ``finished``) needs the rank's own loop; the step keeps the ranks in
  lockstep (a rank that left early would leave the others waiting in a collective).
- restart (from a step): the step goes into a file of the run directory
  (:func:`megascope.engine.runtime.run_dir.write_restart_request`), read by the next start of the ranks; then
  the ranks get SIGKILL and torch elastic starts them again. Why not the stream: a restart is wanted most when a
  rank hangs, and a hung rank cannot read its stream; the file outlives the processes it restarts. A user's
  script that reports no steps (only its rank guards attach) and no --ckpt-dir is restarted the same way, with no
  step: it resumes as it does on its own.
- dump stacks: SIGUSR1 to each rank, whose faulthandler appends every thread's stack to its stack file
  (agent/stacks.py); ``py-spy dump`` from outside for a rank that cannot run its handler. Why not the stream:
  stacks are wanted most from a hung rank; faulthandler writes from inside the signal handler, in C, so a rank
  blocked in a collective answers, and py-spy reads even a stopped one.

The agent's own hang handling (agent/supervision.py) takes the same signal routes (stacks, SIGKILL).

Errors are :class:`ControlError` subclasses, each meaning one status: :class:`Refused` (the job's present state
does not allow it: FAILED_PRECONDITION) and :class:`NoSuchCheckpoint` (NOT_FOUND).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

from megascope.agent import stacks
from megascope.agent.state import NodeState
from megascope.agent.supervision import Supervisor
from megascope.engine.checkpoint.format import committed_steps
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

SAVE_MARGIN_STEPS = 3
"""A save asked for "now" happens this many steps past the newest step reported: every rank must still be before
it when the command arrives, or the ranks would not all save the same step."""
STOP_MARGIN_STEPS = 1
"""A stop asked for "now" happens after the step past the newest reported: soon (a stop is wanted now), and a rank
that gets the command too late refuses it, so the caller falls back to signals."""
ACK_WAIT_SECONDS = 2.0
"""How long a command waits for every rank's CommandAck before it answers without the missing ones (a rank in a
long step, or a worker that does not ack)."""
_KEPT_COMMANDS = 100
"""Commands whose acks are kept (a bound: acks are looked up by id, the newest matter)."""


class ControlError(Exception):
    """A command this node cannot carry out; the text says why (and what to do instead)."""


class Refused(ControlError):
    """Not in the job's present state (no ranks, no checkpoints, a step already done): FAILED_PRECONDITION."""


class NoSuchCheckpoint(ControlError):
    """A step with no committed checkpoint: NOT_FOUND."""


@dataclass
class PendingCommand:
    """A command sent to some ranks, and their answers so far."""

    command: worker_pb2.Command
    sent_to: frozenset[int]
    acks: dict[int, worker_pb2.CommandAck] = field(default_factory=dict)
    gone: set[int] = field(default_factory=set)
    """Ranks it was sent to whose stream ended before they answered."""
    answered: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once every rank it was sent to has answered (or is gone)."""

    def settle(self) -> None:
        if self.sent_to <= self.acks.keys() | self.gone:
            self.answered.set()

    def refusals(self) -> list[str]:
        return [f"rank {rank}: {ack.message or 'refused'}" for rank, ack in sorted(self.acks.items()) if not ack.ok]


@dataclass(frozen=True)
class CommandSent:
    step: int
    """The step the ranks act after."""
    ranks: int
    """How many ranks the command was passed to."""
    command_id: str


@dataclass(frozen=True)
class RestartStarted:
    ranks_stopped: int
    step: int
    """The step the job will resume from (0: from scratch)."""


class JobControl:
    """Save, stop, restart and dump stacks of this node's ranks; see the module docstring for each route."""

    def __init__(
        self,
        state: NodeState,
        supervisor: Supervisor,
        run_dir: str | None = None,
        ckpt_dir: str | None = None,
        ack_wait_seconds: float = ACK_WAIT_SECONDS,
    ) -> None:
        self._state = state
        self._supervisor = supervisor
        self._run_dir = run_dir
        self._ckpt_dir = ckpt_dir
        self._ack_wait_seconds = ack_wait_seconds
        self._outboxes: dict[int, asyncio.Queue[worker_pb2.Command]] = {}
        self._commands: OrderedDict[str, PendingCommand] = OrderedDict()
        self._ids = itertools.count(1)

    # --- the ranks' streams (agent/server.py's WorkerServicer) -----------------------------------------

    def open_channel(self, rank: int) -> asyncio.Queue[worker_pb2.Command]:
        """The queue of commands for a rank that just attached (a newer stream of the rank replaces an older)."""
        outbox: asyncio.Queue[worker_pb2.Command] = asyncio.Queue()
        self._outboxes[rank] = outbox
        return outbox

    def close_channel(self, rank: int, outbox: asyncio.Queue[worker_pb2.Command]) -> None:
        if self._outboxes.get(rank) is outbox:
            del self._outboxes[rank]
        # A rank that is gone will not answer: stop waiting for it.
        for pending in self._commands.values():
            if rank in pending.sent_to and rank not in pending.acks:
                pending.gone.add(rank)
                pending.settle()

    @property
    def attached_ranks(self) -> list[int]:
        return sorted(self._outboxes)

    def acknowledged(self, rank: int, ack: worker_pb2.CommandAck) -> None:
        """A rank's answer to a command; one for a command this agent does not know (any more) is dropped."""
        pending = self._commands.get(ack.command_id)
        if pending is None or rank not in pending.sent_to:
            return
        pending.acks[rank] = ack
        pending.settle()

    def command(self, command_id: str) -> PendingCommand | None:
        """A recent command and the acks it got, by id."""
        return self._commands.get(command_id)

    # --- the commands ---------------------------------------------------------------------------------

    async def save_checkpoint(self, step: int = 0) -> CommandSent:
        """Every rank saves a checkpoint once ``step`` is done (0: a few steps past the newest reported)."""
        pending = self._send(worker_pb2.COMMAND_KIND_CHECKPOINT, step, SAVE_MARGIN_STEPS, "checkpoint")
        step = pending.command.step
        self._state.event(
            f"checkpoint requested after step {step}",
            telemetry_pb2.CheckpointDetail(phase=telemetry_pb2.CheckpointDetail.PHASE_REQUESTED, step=step),
            step=step,
        )
        await self._answers(pending)
        return CommandSent(step, len(pending.sent_to), pending.command.id)

    async def stop(self, step: int = 0) -> CommandSent:
        """Every rank stops training cleanly once ``step`` is done (0: the step after the newest reported)."""
        pending = self._send(worker_pb2.COMMAND_KIND_STOP, step, STOP_MARGIN_STEPS, "stop")
        await self._answers(pending)
        return CommandSent(pending.command.step, len(pending.sent_to), pending.command.id)

    async def restart(self, step: int = 0, reason: str = "") -> RestartStarted:
        """Stop the ranks so that torch elastic starts them again, resuming from checkpoint ``step`` (0: newest)."""
        ckpt_dir = self._ckpt_dir
        if not ckpt_dir:
            live = self._supervisor.live_ranks()
            if step or not live or any(s.source != telemetry_pb2.RANK_SOURCE_PROCESS for s in live):
                raise Refused("this run saves no checkpoints (no --ckpt-dir): a restart would start from step 0")
            # A script that reports no steps keeps its checkpoints its own way: stopped, it resumes as it does alone.
            why = reason or "requested over the AgentService"
            stopped = self._supervisor.request_restart(f"{why}; the script resumes as it does on its own")
            return RestartStarted(stopped, 0)
        steps = await asyncio.to_thread(committed_steps, Path(ckpt_dir))
        if step and step not in steps:
            known = ", ".join(map(str, steps)) or "none yet"
            raise NoSuchCheckpoint(f"step: no committed checkpoint at step {step} in {ckpt_dir} (committed: {known})")
        if not self._supervisor.live_ranks():
            raise Refused("no training rank is running on this node")
        resume = step or (steps[-1] if steps else 0)
        if step and self._run_dir:
            # Before the ranks are stopped: their next start must find it.
            await asyncio.to_thread(run_paths.write_restart_request, self._run_dir, step)
        reason = reason or "requested over the AgentService"
        stopped = self._supervisor.request_restart(f"{reason}; resuming from step {resume}", step or None)
        return RestartStarted(stopped, resume)

    async def dump_stacks(self, timeout: float = stacks.DEFAULT_TIMEOUT_SECONDS) -> agent_pb2.DumpStacksResponse:
        """Every rank's stacks (signal, or py-spy from outside) and the diagnosis of them."""
        return await self._supervisor.collect_stacks(timeout)

    # --- inside ---------------------------------------------------------------------------------------

    def _send(self, kind: worker_pb2.CommandKind.ValueType, step: int, margin: int, name: str) -> PendingCommand:
        """Send a command to every attached rank, to act after ``step`` (0: ``margin`` steps past the newest)."""
        if not self._outboxes:
            raise Refused("no training rank is attached to this agent")
        newest = max((s.last_step for s in self._state.ranks.values() if s.HasField("last_step")), default=0)
        step = step or newest + margin
        if step <= newest:
            raise Refused(f"step: {step} is already done (ranks are at step {newest}); ask for a later step")
        command = worker_pb2.Command(id=f"{name}-{step}-{next(self._ids)}", kind=kind, step=step)
        pending = PendingCommand(command, frozenset(self._outboxes))
        self._commands[command.id] = pending
        while len(self._commands) > _KEPT_COMMANDS:
            self._commands.popitem(last=False)
        for outbox in self._outboxes.values():
            outbox.put_nowait(command)
        return pending

    async def _answers(self, pending: PendingCommand) -> None:
        """Wait (a little) for every rank's ack; Refused naming the ranks that said no."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pending.answered.wait(), self._ack_wait_seconds)
        refusals = pending.refusals()
        if refusals:
            raise Refused(f"{worker_pb2.CommandKind.Name(pending.command.kind)} refused by " + "; ".join(refusals))
