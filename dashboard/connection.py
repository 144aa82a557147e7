"""One asyncio task per agent: watch its telemetry stream and feed the cluster model, forever.

``watch_agent`` opens its gRPC channel inside the running event loop (grpc.aio objects belong to the loop
that creates them), calls ``AgentService.Watch`` and hands every batch to the model. When the agent ends the
stream it marks the agent DISCONNECTED; when the stream breaks, or brings nothing for the heartbeat window
(``STALE_AFTER``: a frozen or partitioned host keeps its TCP connection open), LOST. Either way it reconnects
with exponential backoff plus jitter. It never raises into its caller; cancelling the task closes the channel
and ends it cleanly.

``collect_once`` is the one-shot variant behind ``megascope status``: read the back-fill, then stop.

``call_agents`` makes one control call on several agents at once (``dump_stacks``, ``restart_job``,
``save_checkpoint``) and returns each agent's reply or error.

Every call goes over the client's :class:`~megascope.dashboard.transport.Transport` (plaintext or TLS, with a
client certificate for mutual TLS) and carries its token when it has one: control calls need it, and reads too
on agents started with ``--token-reads``.

``list_checkpoints``, ``start_merge`` (a stream of progress), ``merge_status`` and ``cancel_merge`` are the
checkpoints screen's calls.

These are the gRPC layer only: the dashboard makes every call through its control object
(:mod:`megascope.dashboard.control`), which holds the token and refuses control calls when read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.transport import PLAINTEXT, Transport
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc

INITIAL_BACKOFF = 0.25
MAX_BACKOFF = 5.0
STALE_AFTER = 15.0
"""The heartbeat window: seconds without a batch (an agent sends one every 0.25 s) after which its node is LOST."""
# The dashboard receives one batch every ~250 ms per agent; a reconnect's back-fill can be large.
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]


LISTEN_HINT = "an agent listens on 127.0.0.1 only, unless started with --host"


def describe_error(error: BaseException) -> str:
    """A one-line reason a person can act on: what went wrong, then what to do about it."""
    if isinstance(error, grpc.aio.AioRpcError):
        return describe_rpc_error(error.code(), error.details() or "")
    if isinstance(error, asyncio.TimeoutError):
        return f"no telemetry for {STALE_AFTER:g}s"
    return f"{type(error).__name__}: {error}"


def describe_rpc_error(code: grpc.StatusCode, details: str) -> str:
    text = details.lower()
    first = details.splitlines()[0] if details else ""
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return f"no token ({first}): pass the agent's token with --token-file or $MEGASCOPE_TOKEN"
    if code == grpc.StatusCode.PERMISSION_DENIED:
        return f"wrong token ({first}): pass the agent's token with --token-file or $MEGASCOPE_TOKEN"
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return "timeout: no answer (the host down, a firewall dropping the port, or the agent stuck)"
    if "connection refused" in text:
        return f"refused: nothing listens at that address (is the agent running? {LISTEN_HINT})"
    if "wrong_version_number" in text:
        return "TLS: the agent speaks plaintext; leave out --tls (or start the agent with --tls-cert/--tls-key)"
    if "certificate_verify_failed" in text:
        return "TLS: the agent's certificate is not signed by --tls-ca (or the system's roots); check --tls-ca"
    if "handshake" in text or "ssl" in text:
        return f"TLS handshake failed ({first}): check --tls-ca, --tls-cert/--tls-key and --tls-server-name"
    if "socket closed" in text:
        return (
            "closed while connecting: the agent may serve TLS (pass --tls and --tls-ca) "
            "or require a client certificate (--tls-cert/--tls-key)"
        )
    if "resolving" in text or "domain name not found" in text or "dns" in text:
        return f"unknown host: its name does not resolve ({first})"
    return f"{code.name}: {first}" if first else code.name


class _Backoff:
    """0.25 s doubling up to 5 s, each delay jittered by +-``jitter`` so many dashboards do not retry in step."""

    def __init__(self, initial: float, maximum: float, jitter: float, rng: random.Random) -> None:
        self.initial, self.maximum, self.jitter, self.rng = initial, maximum, jitter, rng
        self.current = initial

    def next(self) -> float:
        delay = self.current * (1.0 + self.rng.uniform(-self.jitter, self.jitter))
        self.current = min(self.current * 2.0, self.maximum)
        return delay

    def reset(self) -> None:
        self.current = self.initial


async def _read(call: Any, seconds: float) -> Any:
    """The stream's next message or EOF; TimeoutError after ``seconds``.

    Not ``asyncio.wait_for``: before Python 3.12 it can swallow a cancellation that lands as the read
    completes, and a watcher that misses its cancel keeps reconnecting forever.
    """
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(seconds):
            return await call.read()
    return await asyncio.wait_for(call.read(), seconds)  # pragma: no cover - Python 3.10


async def watch_agent(
    model: ClusterModel,
    address: str,
    *,
    backfill_seconds: float = 0.0,
    initial_backoff: float = INITIAL_BACKOFF,
    max_backoff: float = MAX_BACKOFF,
    stale_after: float = STALE_AFTER,
    transport: Transport = PLAINTEXT,
) -> None:
    """Keep ``model`` fed from the agent at ``address`` until cancelled. Never raises (except cancellation)."""
    backoff = _Backoff(initial_backoff, max_backoff, 0.2, random.Random())
    agent = model.add_agent(address)
    # CONNECTING only before the first answer; after a loss the node stays DISCONNECTED (with the reason and
    # since when) while retries run, rather than flickering between states.
    model.set_connecting(address)
    while True:
        batches_before = agent.batches
        lost = True
        try:
            await _stream_once(model, address, backfill_seconds, stale_after, transport)
            error, lost = "stream ended (agent stopped?)", False
        except asyncio.CancelledError:
            raise
        except TimeoutError:
            error = f"no telemetry for {stale_after:g}s"
        except Exception as exc:  # any failure is a disconnect to show, never a crash
            error = describe_error(exc)
        model.set_disconnected(address, error, lost=lost)
        if agent.batches > batches_before:
            backoff.reset()  # it was up: the first retry after losing it comes quickly
        await asyncio.sleep(backoff.next())


async def _stream_once(
    model: ClusterModel, address: str, backfill_seconds: float, stale_after: float, transport: Transport
) -> None:
    """Read one Watch stream until it ends (returns) or fails (raises)."""
    received = False
    async with transport.channel(address, _CHANNEL_OPTIONS) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        call = stub.Watch(agent_pb2.WatchRequest(backfill_seconds=backfill_seconds), metadata=transport.metadata())
        try:
            while True:
                # A live agent sends a batch every ~250 ms; a long silence means it is stuck or unreachable
                # (a frozen host keeps the TCP connection open), so give up and reconnect.
                response = await _read(call, stale_after)
                if response is grpc.aio.EOF:
                    break
                model.ingest(address, response.telemetry)
                if not received:  # after the first ingest, so the node has its name for the event log
                    received = True
                    model.set_connected(address)
        finally:
            call.cancel()


async def collect_once(model: ClusterModel, address: str, timeout: float, transport: Transport = PLAINTEXT) -> None:
    """Fill ``model`` with what the agent at ``address`` has, within ``timeout`` seconds, then disconnect.

    Reads the Watch back-fill and the first live batch (which carries the current rank statuses). Leaves the
    agent CONNECTED if it answered at all, DISCONNECTED with the reason if it did not. Never raises.
    """
    model.set_connecting(address)
    deadline = time.monotonic() + timeout
    answered = False
    error = f"no answer within {timeout:g}s"
    try:
        async with transport.channel(address, _CHANNEL_OPTIONS) as channel:
            stub = agent_pb2_grpc.AgentServiceStub(channel)
            call = stub.Watch(agent_pb2.WatchRequest(), metadata=transport.metadata())
            try:
                while (remaining := deadline - time.monotonic()) > 0:
                    response = await _read(call, remaining)
                    if response is grpc.aio.EOF:
                        error = "stream ended before any telemetry"
                        break
                    model.ingest(address, response.telemetry)
                    if not answered:
                        answered = True
                        model.set_connected(address)
                    if not response.telemetry.backfill:
                        break  # back-fill done and the current state seen: that is the snapshot
            finally:
                call.cancel()
    except asyncio.CancelledError:
        raise
    except asyncio.TimeoutError:
        pass  # keep "no answer within ..."
    except Exception as exc:
        error = describe_error(exc)
    if not answered:
        model.set_disconnected(address, error)


async def collect_all(
    model: ClusterModel, addresses: list[str], timeout: float, transport: Transport = PLAINTEXT
) -> None:
    """``collect_once`` for every agent, concurrently."""
    await asyncio.gather(*(collect_once(model, a, timeout, transport) for a in addresses))


async def cancel_quietly(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel watcher tasks and wait for them to finish."""
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- control calls: one call on several agents at once -------------------------------------------------------

STACKS_TIMEOUT = 3.0
"""Seconds an agent waits for its ranks' stacks when the dashboard asks (``s``): short, so that a rank that
cannot answer shows as such within seconds rather than holding the screen."""
CONTROL_TIMEOUT = 10.0
"""Deadline of a control call that only starts something (Restart: the agent stops its ranks and answers)."""
_DEADLINE_MARGIN = 2.0
"""A call's deadline beyond the time the agent itself may take, for the round trip."""

T = TypeVar("T")


@dataclass(frozen=True)
class AgentReply(Generic[T]):
    """One agent's answer to a call made on several: its reply, or (``reply`` None) why there is none."""

    address: str
    reply: T | None
    error: str = ""


async def call_agents(
    addresses: Sequence[str],
    call: Callable[[agent_pb2_grpc.AgentServiceStub], Awaitable[T]],
    transport: Transport = PLAINTEXT,
) -> list[AgentReply[T]]:
    """``call`` on every agent concurrently, each over a channel of its own; every agent's reply or error, in
    order. Never raises: a refusal (NOT_FOUND, FAILED_PRECONDITION, PERMISSION_DENIED ...) or an unreachable
    agent becomes that agent's one-line error."""

    async def one(address: str) -> AgentReply[T]:
        try:
            async with transport.channel(address, _CHANNEL_OPTIONS) as channel:
                return AgentReply(address, await call(agent_pb2_grpc.AgentServiceStub(channel)))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # one agent's failure is a line in the reply, never the others' loss
            return AgentReply(address, None, describe_error(exc))

    return list(await asyncio.gather(*(one(address) for address in addresses)))


async def dump_stacks(
    addresses: Sequence[str], transport: Transport = PLAINTEXT, timeout: float = STACKS_TIMEOUT
) -> list[AgentReply[agent_pb2.DumpStacksResponse]]:
    """Every rank's stacks and progress from each agent (``DumpStacks``), all agents at once."""
    request = agent_pb2.DumpStacksRequest(timeout_seconds=timeout)
    metadata = transport.metadata()
    return await call_agents(
        addresses,
        lambda stub: stub.DumpStacks(request, timeout=timeout + _DEADLINE_MARGIN, metadata=metadata),
        transport,
    )


async def restart_job(
    addresses: Sequence[str],
    transport: Transport = PLAINTEXT,
    step: int = 0,
    reason: str = "requested from the dashboard",
) -> list[AgentReply[agent_pb2.RestartResponse]]:
    """Ask every agent to stop its ranks so torch elastic restarts the job from checkpoint ``step`` (0: newest).

    Every agent is asked so that every node's ranks stop at once, rather than each node's waiting to fail on
    connections broken by another's."""
    request = agent_pb2.RestartRequest(step=step, reason=reason)
    metadata = transport.metadata()
    return await call_agents(
        addresses, lambda stub: stub.Restart(request, timeout=CONTROL_TIMEOUT, metadata=metadata), transport
    )


async def save_checkpoint(
    addresses: Sequence[str], transport: Transport = PLAINTEXT, step: int = 0
) -> list[AgentReply[agent_pb2.SaveCheckpointResponse]]:
    """Ask every agent's ranks to save a checkpoint after ``step`` (0: each agent picks, for a one-node job).

    Every rank of a job must save the same step, so for several agents the caller picks one and sends it to all."""
    request = agent_pb2.SaveCheckpointRequest(step=step)
    metadata = transport.metadata()
    return await call_agents(
        addresses, lambda stub: stub.SaveCheckpoint(request, timeout=CONTROL_TIMEOUT, metadata=metadata), transport
    )


# -- checkpoints and merges: one agent at a time (all agents of a job share the run's checkpoints) -------------

LIST_TIMEOUT = 10.0
"""Deadline of ListCheckpoints and GetMergeStatus: the agent reads each checkpoint's metadata from its disk."""


async def list_checkpoints(
    addresses: Sequence[str], transport: Transport = PLAINTEXT
) -> list[AgentReply[agent_pb2.ListCheckpointsResponse]]:
    """Each agent's committed checkpoints and merges (``ListCheckpoints``), all agents at once."""
    request = agent_pb2.ListCheckpointsRequest()
    metadata = transport.metadata()
    return await call_agents(
        addresses, lambda stub: stub.ListCheckpoints(request, timeout=LIST_TIMEOUT, metadata=metadata), transport
    )


async def merge_status(address: str, transport: Transport = PLAINTEXT) -> agent_pb2.MergeProgress:
    """The agent's running or last merge (``GetMergeStatus``). Raises grpc.aio.AioRpcError."""
    async with transport.channel(address, _CHANNEL_OPTIONS) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        response = await stub.GetMergeStatus(
            agent_pb2.GetMergeStatusRequest(), timeout=LIST_TIMEOUT, metadata=transport.metadata()
        )
        return response.progress


async def rank_log(
    address: str, rank: int, max_lines: int = 0, transport: Transport = PLAINTEXT
) -> agent_pb2.GetRankLogResponse:
    """The newest lines rank ``rank`` wrote, from the agent of its node (``GetRankLog``). Raises
    grpc.aio.AioRpcError (NOT_FOUND: the rank is not on that node; UNIMPLEMENTED: an agent older than the call)."""
    async with transport.channel(address, _CHANNEL_OPTIONS) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        request = agent_pb2.GetRankLogRequest(rank=rank, max_lines=max_lines)
        return await stub.GetRankLog(request, timeout=LIST_TIMEOUT, metadata=transport.metadata())


async def start_merge(
    address: str, request: agent_pb2.StartMergeRequest, transport: Transport = PLAINTEXT
) -> AsyncIterator[agent_pb2.MergeProgress]:
    """Start a merge on the agent and follow it (``StartMerge``): its progress until it ends, the end last.

    A refusal (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...) raises grpc.aio.AioRpcError before any
    progress. Leaving the loop early stops following, not the merge (``cancel_merge`` does that).
    """
    async with transport.channel(address, _CHANNEL_OPTIONS) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).StartMerge(request, metadata=transport.metadata())
        try:
            async for response in call:
                yield response.progress
        finally:
            call.cancel()


async def cancel_merge(address: str, transport: Transport = PLAINTEXT) -> bool:
    """Stop the agent's running merge (``CancelMerge``); False when none was running. Raises grpc.aio.AioRpcError."""
    async with transport.channel(address, _CHANNEL_OPTIONS) as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        reply = await stub.CancelMerge(
            agent_pb2.CancelMergeRequest(), timeout=CONTROL_TIMEOUT, metadata=transport.metadata()
        )
        return bool(reply.cancelled)
