"""The agent's gRPC services: ``AgentService`` for dashboards, ``WorkerService`` for the node's ranks.

Input from the wire is never trusted: a malformed worker message ends that worker's stream with
``INVALID_ARGUMENT`` and a message naming the field; an oversized one gets ``RESOURCE_EXHAUSTED`` from gRPC
itself (``max_receive_message_length``). Either way the agent keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from megascope.agent import stacks
from megascope.agent.merges import MergeRefused, MergeRunner
from megascope.agent.state import NodeState
from megascope.agent.supervision import Supervisor
from megascope.engine.checkpoint.format import committed_steps
from megascope.engine.runtime.launch import write_restart_request
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2, worker_pb2, worker_pb2_grpc

MAX_MESSAGE_BYTES = 1 << 20
"""A step report is a few hundred bytes; anything near this is garbage or an attack."""
WATCH_TICK_SECONDS = 0.25
_EXIT_LOG_LINES = 50
"""An exit report keeps at most this many first and last lines of the rank's log."""
AGENT_SERVICE = "megascope.v1.AgentService"


class InvalidMessage(ValueError):
    """A message from the wire that breaks the contract; the text names the field."""


def _check_finite_non_negative(message: object, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(message, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidMessage(f"{prefix}.{name}: must be a finite number >= 0, got {value}")


def validate_hello(hello: worker_pb2.Hello) -> None:
    if hello.world_size < 1:
        raise InvalidMessage(f"hello.world_size: must be at least 1, got {hello.world_size}")
    if not 0 <= hello.rank < hello.world_size:
        raise InvalidMessage(f"hello.rank: {hello.rank} is outside [0, world_size={hello.world_size})")
    if hello.local_rank < 0 or hello.pid < 0:
        raise InvalidMessage("hello.local_rank and hello.pid must be >= 0")


def validate_step_report(report: telemetry_pb2.StepReport, rank: int) -> None:
    if report.rank != rank:
        raise InvalidMessage(f"step_report.rank: {report.rank} does not match this stream's rank {rank}")
    if report.step < 0 or report.tokens < 0:
        raise InvalidMessage(f"step_report.step and .tokens must be >= 0, got {report.step} and {report.tokens}")
    _check_finite_non_negative(
        report,
        "step_report",
        ("step_seconds", "data_wait_seconds", "forward_seconds", "backward_seconds", "comm_wait_seconds",
         "optimizer_seconds", "other_seconds", "tokens_per_second", "model_flops", "gc_pause_seconds", "cpu_seconds",
         "device_compute_seconds"),
    )  # fmt: skip
    for index, collective in enumerate(report.collectives):
        _check_finite_non_negative(
            collective, f"step_report.collectives[{index}]", ("duration_seconds", "blocked_seconds")
        )


def validate_event(event: telemetry_pb2.Event) -> None:
    if event.severity not in telemetry_pb2.Event.Severity.values():
        raise InvalidMessage(f"event.severity: unknown value {event.severity}")
    if not event.kind:
        raise InvalidMessage("event.kind: must not be empty")


class _Undecodable:
    """Stands in for a request whose bytes are not a valid protobuf message."""

    def __init__(self, type_name: str, error: Exception) -> None:
        self.text = f"{type_name}: the bytes are not a valid message ({error}); send a serialized {type_name}"


class _RejectUndecodable(grpc.aio.ServerInterceptor):
    """Answers garbage bytes with INVALID_ARGUMENT (gRPC's own default is UNKNOWN, which tells the sender
    nothing), for every method, before any servicer code sees them."""

    async def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_deserializer is None:
            return handler
        parse = handler.request_deserializer
        type_name = handler_call_details.method.rsplit("/", 1)[-1] + "Request"

        def deserialize(data: bytes) -> object:
            try:
                return parse(data)
            except DecodeError as error:
                return _Undecodable(type_name, error)

        if handler.request_streaming:
            behavior = handler.stream_stream

            async def checked_stream(requests, context):  # type: ignore[no-untyped-def]
                async def valid():  # type: ignore[no-untyped-def]
                    async for request in requests:
                        if isinstance(request, _Undecodable):
                            raise InvalidMessage(request.text)
                        yield request

                async for response in behavior(valid(), context):
                    yield response

            return grpc.stream_stream_rpc_method_handler(
                checked_stream, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )
        if handler.response_streaming:
            unary_stream = handler.unary_stream

            async def checked_unary_stream(request, context):  # type: ignore[no-untyped-def]
                if isinstance(request, _Undecodable):
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)
                async for response in unary_stream(request, context):
                    yield response

            return grpc.unary_stream_rpc_method_handler(
                checked_unary_stream, request_deserializer=deserialize, response_serializer=handler.response_serializer
            )
        unary_unary = handler.unary_unary

        async def checked_unary(request, context):  # type: ignore[no-untyped-def]
            if isinstance(request, _Undecodable):
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.text)
            return await unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(
            checked_unary, request_deserializer=deserialize, response_serializer=handler.response_serializer
        )


class WorkerServicer(worker_pb2_grpc.WorkerServiceServicer):
    """One ``Attach`` stream per rank: Hello first, then step reports, heartbeats and events."""

    def __init__(self, state: NodeState) -> None:
        self._state = state
        self.commands: dict[int, asyncio.Queue[worker_pb2.Command]] = {}

    async def Attach(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[worker_pb2.AttachRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.AttachResponse]:
        requests = request_iterator.__aiter__()
        try:
            first = await requests.__anext__()
        except StopAsyncIteration:
            return
        except InvalidMessage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if first.WhichOneof("payload") != "hello":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"AttachRequest: the first message must be hello, got {first.WhichOneof('payload') or 'nothing'}",
            )
        try:
            validate_hello(first.hello)
        except InvalidMessage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        rank = first.hello.rank
        self._state.rank_attached(first.hello)
        commands: asyncio.Queue[worker_pb2.Command] = asyncio.Queue()
        self.commands[rank] = commands
        yield worker_pb2.AttachResponse(
            ack=worker_pb2.Ack(node=self._state.node_info.node, agent_version=self._state.node_info.agent_version)
        )
        reader = asyncio.ensure_future(self._read(requests, rank))
        try:
            while True:
                command = asyncio.ensure_future(commands.get())
                done, _ = await asyncio.wait({reader, command}, return_when=asyncio.FIRST_COMPLETED)
                if command in done:
                    yield worker_pb2.AttachResponse(command=command.result())
                else:
                    command.cancel()
                if reader in done:
                    break
            failure = reader.result()
        finally:
            reader.cancel()
            if self.commands.get(rank) is commands:
                del self.commands[rank]
            self._state.rank_detached(rank)
        if failure is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, failure)

    async def ReportExit(  # noqa: N802
        self, request: worker_pb2.ReportExitRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReportExitResponse:
        report = request.report
        if report.rank < 0 or report.pid < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "report.rank and report.pid must be >= 0")
        if not math.isfinite(report.wall_time):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "report.wall_time: must be a finite number")
        if len(report.log_tail) > 2 * _EXIT_LOG_LINES:
            del report.log_tail[_EXIT_LOG_LINES:-_EXIT_LOG_LINES]
        self._state.rank_exited(report)
        return worker_pb2.ReportExitResponse()

    async def _read(self, requests: AsyncIterator[worker_pb2.AttachRequest], rank: int) -> str | None:
        """Apply the worker's messages until its stream ends; the error text if it sent something invalid."""
        try:
            async for request in requests:
                kind = request.WhichOneof("payload")
                if kind == "step_report":
                    validate_step_report(request.step_report, rank)
                    self._state.add_step(request.step_report)
                elif kind == "heartbeat":
                    self._state.rank_heartbeat(request.heartbeat)
                elif kind == "event":
                    validate_event(request.event)
                    if request.event.kind == "finished":
                        self._state.rank_finished(rank)
                    self._state.add_event(request.event)
                elif kind == "hello":
                    raise InvalidMessage("hello: sent twice on one stream")
                else:
                    raise InvalidMessage("AttachRequest.payload: empty message")
        except InvalidMessage as error:
            return str(error)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass  # the worker went away mid-stream
        return None


SAVE_MARGIN_STEPS = 3
"""A save asked for "now" happens this many steps past the newest step reported: every rank must still
be before it when the request arrives, or the ranks would not all save the same step."""


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        state: NodeState,
        stopping: asyncio.Event,
        workers: WorkerServicer,
        token: str | None = None,
        merges: MergeRunner | None = None,
        supervisor: Supervisor | None = None,
        run_dir: str | None = None,
        ckpt_dir: str | None = None,
    ) -> None:
        self._state = state
        self._stopping = stopping
        self._workers = workers
        self._token = token
        self._merges = merges if merges is not None else MergeRunner(state, None)
        self._supervisor = supervisor if supervisor is not None else Supervisor(state)
        self._run_dir = run_dir
        self._ckpt_dir = ckpt_dir

    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """Control RPCs need the agent's token when it has one."""
        if not self._token:
            return
        given = dict(context.invocation_metadata() or ()).get("authorization")
        if given is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                "this agent requires a token: send metadata 'authorization: Bearer TOKEN'",
            )
        if given != f"Bearer {self._token}":
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong token for this agent")

    async def SaveCheckpoint(  # noqa: N802
        self, request: agent_pb2.SaveCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.SaveCheckpointResponse:
        await self._authorize(context)
        if request.step < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step: must be >= 0, got {request.step}")
        if not self._workers.commands:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no training rank is attached to this agent")
        newest = max((s.last_step for s in self._state.ranks.values() if s.HasField("last_step")), default=0)
        step = request.step or newest + SAVE_MARGIN_STEPS
        if step <= newest:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"step: {step} is already done (ranks are at step {newest}); ask for a later step",
            )
        command = worker_pb2.Command(
            id=f"checkpoint-{step}", kind=worker_pb2.COMMAND_KIND_CHECKPOINT, arguments={"step": str(step)}
        )
        for queue in self._workers.commands.values():
            queue.put_nowait(command)
        self._state.event("checkpoint_requested", f"checkpoint requested after step {step}", step=step)
        return agent_pb2.SaveCheckpointResponse(step=step, ranks=len(self._workers.commands))

    async def Watch(  # noqa: N802
        self, request: agent_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.WatchResponse]:
        seconds = request.backfill_seconds
        if not math.isfinite(seconds) or seconds < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"backfill_seconds: must be >= 0, got {seconds}")
        sub, backfill = self._state.subscribe(seconds)
        try:
            for batch in backfill:
                yield agent_pb2.WatchResponse(telemetry=batch)
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), WATCH_TICK_SECONDS)
                yield agent_pb2.WatchResponse(telemetry=self._state.take(sub))
        finally:
            self._state.unsubscribe(sub)

    async def GetSnapshot(  # noqa: N802
        self, request: agent_pb2.GetSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetSnapshotResponse:
        return self._state.snapshot()

    async def GetEvents(  # noqa: N802
        self, request: agent_pb2.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetEventsResponse:
        if request.limit < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"limit: must be >= 0, got {request.limit}")
        if not math.isfinite(request.since_wall_time):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "since_wall_time: must be a finite number")
        events = self._state.events_since(request.since_wall_time, request.limit, set(request.kinds))
        return agent_pb2.GetEventsResponse(events=events)

    # --- checkpoints and merges (agent/merges.py) ------------------------------------------------------

    async def ListCheckpoints(  # noqa: N802
        self, request: agent_pb2.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ListCheckpointsResponse:
        return await self._merges.list_checkpoints()

    async def StartMerge(  # noqa: N802
        self, request: agent_pb2.StartMergeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.StartMergeResponse]:
        await self._authorize(context)
        try:
            # Everything is checked before the merge process starts, so a bad request costs nothing.
            plan = await asyncio.to_thread(self._merges.plan, request)
            run = self._merges.start(plan)
        except MergeRefused as refusal:
            await context.abort(refusal.code, str(refusal))
        # Ending this stream (the client went away) leaves the merge running: CancelMerge stops it.
        async for progress in self._merges.follow(run):
            yield agent_pb2.StartMergeResponse(progress=progress)

    async def GetMergeStatus(  # noqa: N802
        self, request: agent_pb2.GetMergeStatusRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetMergeStatusResponse:
        return agent_pb2.GetMergeStatusResponse(progress=self._merges.status())

    async def CancelMerge(  # noqa: N802
        self, request: agent_pb2.CancelMergeRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.CancelMergeResponse:
        await self._authorize(context)
        return agent_pb2.CancelMergeResponse(cancelled=self._merges.cancel())

    # --- restarts and stacks (agent/supervision.py) -----------------------------------------------------

    async def Restart(  # noqa: N802
        self, request: agent_pb2.RestartRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RestartResponse:
        await self._authorize(context)
        if request.step < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"step: must be >= 0, got {request.step}")
        ckpt_dir = self._ckpt_dir or ""
        if not ckpt_dir:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                "this run saves no checkpoints (no --ckpt-dir): a restart would start from step 0",
            )
        steps = committed_steps(Path(ckpt_dir))
        if request.step and request.step not in steps:
            known = ", ".join(map(str, steps)) or "none yet"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"step: no committed checkpoint at step {request.step} in {ckpt_dir} (committed: {known})",
            )
        if not self._supervisor.live_ranks():
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no training rank is running on this node")
        step = request.step or (steps[-1] if steps else 0)
        if request.step and self._run_dir:
            await asyncio.to_thread(write_restart_request, Path(self._run_dir), request.step)
        reason = request.reason or "requested over the AgentService"
        stopped = self._supervisor.request_restart(f"{reason}; resuming from step {step}")
        return agent_pb2.RestartResponse(ranks_stopped=stopped, step=step)

    async def DumpStacks(  # noqa: N802
        self, request: agent_pb2.DumpStacksRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.DumpStacksResponse:
        await self._authorize(context)
        timeout = request.timeout_seconds or stacks.DEFAULT_TIMEOUT_SECONDS
        if not math.isfinite(timeout) or not 0 < timeout <= 60:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"timeout_seconds: must be in (0, 60], got {request.timeout_seconds}"
            )
        return await self._supervisor.collect_stacks(timeout)


class AgentServer:
    """The gRPC server with both services and the standard health service, bound to ``host:port``."""

    def __init__(
        self,
        state: NodeState,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        merges: MergeRunner | None = None,
        supervisor: Supervisor | None = None,
        run_dir: str | None = None,
        ckpt_dir: str | None = None,
    ) -> None:
        self.state = state
        self.stopping = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.workers = WorkerServicer(state)
        self.merges = merges if merges is not None else MergeRunner(state, None)
        self._server = grpc.aio.server(
            interceptors=[_RejectUndecodable()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(state, self.stopping, self.workers, token, self.merges, supervisor, run_dir, ckpt_dir),
            self._server,
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.workers, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind the agent to {host}:{port}; is the port taken? Use --port 0 for any")
        self.address = f"{host}:{self.port}"

    async def start(self) -> None:
        await self._server.start()
        for service in ("", AGENT_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Health NOT_SERVING, end the Watch streams with a last batch, then stop the server."""
        for service in ("", AGENT_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.stopping.set()
        await asyncio.sleep(0.05)  # let each Watch stream send its final batch
        await self._server.stop(grace_seconds)
