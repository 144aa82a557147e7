"""The agent's gRPC services: ``AgentService`` for dashboards, ``WorkerService`` for the node's ranks.

The servicers are adapters: they validate (agent/validation.py), call the node state, the job control
(agent/control.py) or the merge runner, and map errors to status codes. Input from the wire is never trusted: a
malformed worker message ends that worker's stream with ``INVALID_ARGUMENT`` and a message naming the field; an
oversized one gets ``RESOURCE_EXHAUSTED`` from gRPC itself (``max_receive_message_length``). Either way the agent
keeps serving everyone else.

The two services listen apart. ``AgentService`` (and health) on the public ``host:port``; ``WorkerService`` only on
the worker channel, a Unix socket of mode 0600 (in the run directory, or a private temporary directory), and only
for callers that send the job's secret (random, made by the agent, handed to the ranks it launches through their
environment: engine/runtime/agent_link.py). What a rank then says is checked against what the agent launched
(:class:`~megascope.agent.validation.Launched`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
import secrets
import shutil
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from megascope.agent import auth, stacks, validation
from megascope.agent.control import ControlError, JobControl, NoSuchCheckpoint
from megascope.agent.merges import MergeRefused, MergeRunner
from megascope.agent.processes import is_descendant, launched_rank
from megascope.agent.state import NodeState
from megascope.agent.supervision import Supervisor
from megascope.agent.validation import InvalidMessage, Launched
from megascope.engine.runtime.agent_link import SECRET_METADATA_KEY
from megascope.engine.runtime.run_dir import SOCKET_PATH_MAX
from megascope.protos import events
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, worker_pb2, worker_pb2_grpc

MAX_MESSAGE_BYTES = 1 << 20
"""A step report is a few hundred bytes; anything near this is garbage or an attack."""
WATCH_TICK_SECONDS = 0.25
_EXIT_LOG_LINES = 50
"""An exit report keeps at most this many first and last lines of the rank's log."""
AGENT_SERVICE = "megascope.v1.AgentService"
PUBLIC_SERVICES = (
    AGENT_SERVICE,
    health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
    reflection.SERVICE_NAME,
)
"""What server reflection lists on the public port."""


_REFUSALS = (InvalidMessage, ControlError)
"""What a request can be refused with; :func:`_status` names each one's status code."""


def _status(error: Exception) -> grpc.StatusCode:
    """The status code of a refusal: INVALID_ARGUMENT for a bad request, NOT_FOUND for a missing checkpoint, and
    FAILED_PRECONDITION for what the job's present state does not allow (:class:`~megascope.agent.control.Refused`)."""
    if isinstance(error, InvalidMessage):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, NoSuchCheckpoint):
        return grpc.StatusCode.NOT_FOUND
    return grpc.StatusCode.FAILED_PRECONDITION


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
    """One ``Attach`` stream per rank: Hello first, then step reports, heartbeats, events and lifecycle messages
    up; commands (from :class:`~megascope.agent.control.JobControl`) down. A rank's guard holds a stream of its own
    (``Hello.role`` GUARD): progress and ``finished`` up, nothing down."""

    def __init__(self, state: NodeState, control: JobControl, secret: str, launched: Launched) -> None:
        self._state = state
        self._control = control
        self._secret = secret
        self.launched = launched

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> None:
        """Only the ranks this agent launched know the job's secret."""
        given = dict(context.invocation_metadata() or ()).get(SECRET_METADATA_KEY)
        if given is None:
            await context.abort(
                grpc.StatusCode.UNAUTHENTICATED,
                f"WorkerService is for the ranks this agent launched: send metadata {SECRET_METADATA_KEY!r}",
            )
        if not hmac.compare_digest(str(given).encode(), self._secret.encode()):
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "wrong worker secret for this agent")

    async def Attach(  # noqa: N802 (gRPC method name)
        self, request_iterator: AsyncIterator[worker_pb2.AttachRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[worker_pb2.AttachResponse]:
        await self._authenticate(context)
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
        hello = first.hello
        if hello.stack_file:
            hello.stack_file = os.path.abspath(hello.stack_file)  # the ranks run in the agent's directory
        try:
            validation.validate_hello(hello, self.launched)
        except InvalidMessage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        guard = hello.role == worker_pb2.WORKER_ROLE_GUARD
        self._state.rank_attached(hello)
        # A guard cannot act on commands (it does not train): they go to the rank's own stream only.
        commands: asyncio.Queue[worker_pb2.Command] = (
            asyncio.Queue() if guard else self._control.open_channel(hello.rank)
        )
        stream = _StreamEnd()
        yield worker_pb2.AttachResponse(
            ack=worker_pb2.Ack(node=self._state.node_info.node, agent_version=self._state.node_info.agent_version)
        )
        reader = asyncio.ensure_future(self._read(requests, hello, stream))
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
            if guard:
                self._state.guard_detached(hello, stream.finished)
            else:
                self._control.close_channel(hello.rank, commands)
                self._state.rank_detached(hello.rank, hello.pid)
        if failure is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, failure)

    async def ReportExit(  # noqa: N802
        self, request: worker_pb2.ReportExitRequest, context: grpc.aio.ServicerContext
    ) -> worker_pb2.ReportExitResponse:
        await self._authenticate(context)
        report = request.report
        try:
            validation.validate_exit_report(report, self.launched, time.time(), self._state.node_info.world_size)
        except InvalidMessage as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        if len(report.log_tail) > 2 * _EXIT_LOG_LINES:
            del report.log_tail[_EXIT_LOG_LINES:-_EXIT_LOG_LINES]
        self._state.rank_exited(validation.trim_exit_report(report))
        return worker_pb2.ReportExitResponse()

    async def _read(
        self, requests: AsyncIterator[worker_pb2.AttachRequest], hello: worker_pb2.Hello, stream: _StreamEnd
    ) -> str | None:
        """Apply the worker's messages until its stream ends; the error text if it sent something invalid."""
        rank, launched = hello.rank, self.launched
        guard = hello.role == worker_pb2.WORKER_ROLE_GUARD
        try:
            async for request in requests:
                kind = request.WhichOneof("payload")
                if guard:
                    self._read_guard(request, hello)
                    stream.finished = stream.finished or kind == "finished"
                elif kind == "step_report":
                    validation.validate_step_report(request.step_report, rank, hello, launched, time.time())
                    self._state.add_step(validation.trim_scalars(request.step_report))
                elif kind == "heartbeat":
                    validation.validate_heartbeat(request.heartbeat, hello, launched, time.time())
                    self._state.rank_heartbeat(request.heartbeat)
                elif kind == "event":
                    validation.validate_event(request.event, rank, launched, time.time())
                    if request.event.WhichOneof("detail") is not None:
                        request.event.kind = events.kind_of(request.event)  # one spelling, whatever was sent
                    # For people: the agent acts on no event. Its text is trimmed to a size.
                    self._state.add_event(validation.trim_event(request.event))
                elif kind == "finished":
                    validation.validate_finished(request.finished)
                    self._state.rank_finished(rank)
                elif kind == "failure":
                    validation.validate_failure(request.failure, rank, hello.pid, launched, time.time())
                    self._state.rank_failed(validation.trim_exit_report(_failure_report(request.failure, hello)))
                elif kind == "self_check":
                    validation.validate_self_check(request.self_check)
                    self._state.self_checked(request.self_check)
                elif kind == "command_ack":
                    validation.validate_command_ack(request.command_ack)
                    self._control.acknowledged(rank, request.command_ack)
                elif kind == "hello":
                    raise InvalidMessage("hello: sent twice on one stream")
                elif kind == "progress":
                    raise InvalidMessage("progress: only a rank's guard sends it (Hello.role WORKER_ROLE_GUARD)")
                else:
                    raise InvalidMessage("AttachRequest.payload: empty message")
        except InvalidMessage as error:
            return str(error)
        except (grpc.aio.AioRpcError, asyncio.CancelledError):
            pass  # the worker went away mid-stream
        return None

    def _read_guard(self, request: worker_pb2.AttachRequest, hello: worker_pb2.Hello) -> None:
        """One message of a rank guard's stream: progress, finished, or the idle heartbeat of its link."""
        kind = request.WhichOneof("payload")
        if kind == "progress":
            validation.validate_progress(request.progress, self.launched, time.time())
            trimmed = validation.trim_progress_lines(request.progress)
            del request.progress.lines[:]
            request.progress.lines.extend(trimmed)
            self._state.rank_progress(hello, request.progress)
        elif kind == "finished":
            validation.validate_finished(request.finished)
        elif kind == "heartbeat":
            validation.validate_heartbeat(request.heartbeat, hello, self.launched, time.time())
        elif kind == "hello":
            raise InvalidMessage("hello: sent twice on one stream")
        else:
            raise InvalidMessage(
                f"{kind or 'AttachRequest.payload'}: a rank guard's stream carries progress, heartbeat and finished "
                "only; the rank's own messages go on its own stream"
            )


class _StreamEnd:
    """How a stream ended: whether it said ``finished`` first."""

    finished = False


def _failure_report(report: worker_pb2.ExitReport, hello: worker_pb2.Hello) -> worker_pb2.ExitReport:
    """A rank's own failure report, completed from its Hello: it has not exited yet, so its exit code is 1
    (what an uncaught exception gives) unless it says otherwise."""
    complete = worker_pb2.ExitReport()
    complete.CopyFrom(report)
    complete.pid = complete.pid or hello.pid
    complete.local_rank = complete.local_rank or hello.local_rank
    complete.restart_count = complete.restart_count or hello.restart_count
    if not complete.exit_code and not complete.signal:
        complete.exit_code = 1
    if len(complete.log_tail) > 2 * _EXIT_LOG_LINES:
        del complete.log_tail[_EXIT_LOG_LINES:-_EXIT_LOG_LINES]
    return complete


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):
    """Thin adapters: validate the request, call the job control (or the merge runner, or the node state), and
    map errors to status codes. The token is checked before any of them, by the server's TokenCheck
    interceptor (agent/auth.py)."""

    def __init__(
        self,
        state: NodeState,
        stopping: asyncio.Event,
        control: JobControl,
        merges: MergeRunner | None = None,
    ) -> None:
        self._state = state
        self._stopping = stopping
        self._control = control
        self._merges = merges if merges is not None else MergeRunner(state, None)

    # --- telemetry -------------------------------------------------------------------------------------

    async def Watch(  # noqa: N802
        self, request: agent_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.WatchResponse]:
        try:
            validation.validate_watch(request)
        except _REFUSALS as error:
            await context.abort(_status(error), str(error))
        sub, backfill = self._state.subscribe(request.backfill_seconds)
        try:
            for batch in backfill:
                yield agent_pb2.WatchResponse(telemetry=batch)
            while not self._stopping.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), WATCH_TICK_SECONDS)
                for batch in self._state.take(sub):  # one, unless more came than one message may hold
                    yield agent_pb2.WatchResponse(telemetry=batch)
        finally:
            self._state.unsubscribe(sub)

    async def GetSnapshot(  # noqa: N802
        self, request: agent_pb2.GetSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetSnapshotResponse:
        return self._state.snapshot()

    async def GetEvents(  # noqa: N802
        self, request: agent_pb2.GetEventsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetEventsResponse:
        try:
            validation.validate_get_events(request)
        except _REFUSALS as error:
            await context.abort(_status(error), str(error))
        return self._state.get_events(request.since_wall_time, request.limit, set(request.kinds))

    async def GetRankLog(  # noqa: N802
        self, request: agent_pb2.GetRankLogRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.GetRankLogResponse:
        try:
            max_lines = validation.rank_log_lines(request, self._state.node_info.world_size)
        except _REFUSALS as error:
            await context.abort(_status(error), str(error))
        answer = self._state.rank_log(request.rank, max_lines)
        if answer is None:
            here = ", ".join(map(str, sorted(self._state.ranks))) or "none yet"
            await context.abort(
                grpc.StatusCode.NOT_FOUND,
                f"rank {request.rank} does not run on node {self._state.node_info.node} (its ranks: {here}); ask the "
                "agent of the rank's node",
            )
        return answer

    # --- job control (agent/control.py) ----------------------------------------------------------------

    async def SaveCheckpoint(  # noqa: N802
        self, request: agent_pb2.SaveCheckpointRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.SaveCheckpointResponse:
        try:
            validation.validate_step_request(request.step)
            sent = await self._control.save_checkpoint(request.step)
        except _REFUSALS as error:
            await context.abort(_status(error), str(error))
        return agent_pb2.SaveCheckpointResponse(step=sent.step, ranks=sent.ranks)

    async def Restart(  # noqa: N802
        self, request: agent_pb2.RestartRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.RestartResponse:
        try:
            validation.validate_step_request(request.step)
            started = await self._control.restart(request.step, request.reason)
        except _REFUSALS as error:
            await context.abort(_status(error), str(error))
        return agent_pb2.RestartResponse(ranks_stopped=started.ranks_stopped, step=started.step)

    async def DumpStacks(  # noqa: N802
        self, request: agent_pb2.DumpStacksRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.DumpStacksResponse:
        try:
            timeout = validation.dump_stacks_timeout(request, stacks.DEFAULT_TIMEOUT_SECONDS)
        except _REFUSALS as error:
            await context.abort(_status(error), str(error))
        return await self._control.dump_stacks(timeout)

    # --- checkpoints and merges (agent/merges.py) ------------------------------------------------------

    async def ListCheckpoints(  # noqa: N802
        self, request: agent_pb2.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> agent_pb2.ListCheckpointsResponse:
        return await self._merges.list_checkpoints()

    async def StartMerge(  # noqa: N802
        self, request: agent_pb2.StartMergeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_pb2.StartMergeResponse]:
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
        return agent_pb2.CancelMergeResponse(cancelled=self._merges.cancel())


class AgentServer:
    """``AgentService``, the standard health service and server reflection on ``host:port``; ``WorkerService`` on
    the worker channel (:attr:`worker_address`, a Unix socket), for callers with :attr:`worker_secret` only.

    ``worker_socket``: where the socket goes (the agent: the run directory's; a path too long for a socket, or
    None, gets a private temporary directory). ``launched``: what the ranks' claims are checked against (default:
    pids must be this process's descendants, wall times after now).
    """

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
        control: JobControl | None = None,
        token_reads: bool = False,
        tls: auth.ServerTLS | None = None,
        worker_socket: str | Path | None = None,
        worker_secret: str | None = None,
        launched: Launched | None = None,
    ) -> None:
        self.state = state
        self.stopping = asyncio.Event()
        self.health = health.aio.HealthServicer()
        self.merges = merges if merges is not None else MergeRunner(state, None)
        if control is None:
            control = JobControl(state, supervisor or Supervisor(state), run_dir, ckpt_dir)
        self.control = control
        self.worker_secret = worker_secret or secrets.token_urlsafe(32)
        if launched is None:
            launched = Launched(
                started=time.time(), owns_pid=is_descendant, running=is_descendant, rank_of=launched_rank
            )
        self.workers = WorkerServicer(state, control, self.worker_secret, launched)
        self._server = grpc.aio.server(
            # The token first: a caller without it learns nothing, not even whether its bytes parse.
            interceptors=[auth.TokenCheck(token, reads=token_reads), _RejectUndecodable()],
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.so_reuseport", 0),
            ],
        )
        agent_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServicer(state, self.stopping, control, self.merges), self._server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        # Generic clients (grpcurl, Postman, grpcui) list and call the services without the .proto files. A read
        # under the token rules (auth.classify). Not on the worker channel: only our own ranks talk there.
        reflection.enable_server_reflection(PUBLIC_SERVICES, self._server)
        if tls is not None:
            self.port = self._server.add_secure_port(f"{host}:{port}", tls.credentials())
        else:
            self.port = self._server.add_insecure_port(f"{host}:{port}")
        if self.port == 0:
            raise OSError(f"could not bind the agent to {host}:{port}; is the port taken? Use --port 0 for any")
        self.address = f"{host}:{self.port}"
        # The ranks' own channel: WorkerService only, never on the public port.
        self._worker_server = grpc.aio.server(
            interceptors=[_RejectUndecodable()], options=[("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
        )
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(self.workers, self._worker_server)
        self.worker_socket, self._private_dir = _socket_path(worker_socket)
        self.worker_address = _bind_socket(self._worker_server, self.worker_socket)

    async def start(self) -> None:
        await self._worker_server.start()
        await self._server.start()
        for service in ("", AGENT_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)

    async def stop(self, grace_seconds: float = 2.0) -> None:
        """Health NOT_SERVING, end the Watch streams with a last batch, then stop the server."""
        for service in ("", AGENT_SERVICE):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.stopping.set()
        await asyncio.sleep(0.05)  # let each Watch stream send its final batch
        await asyncio.gather(self._server.stop(grace_seconds), self._worker_server.stop(grace_seconds))
        with contextlib.suppress(OSError):
            self.worker_socket.unlink()
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)


def _socket_path(wanted: str | Path | None) -> tuple[Path, Path | None]:
    """The worker socket's path, and the private directory made for it (None: ``wanted`` was usable)."""
    if wanted is not None and len(os.fsencode(os.path.abspath(wanted))) <= SOCKET_PATH_MAX:
        return Path(os.path.abspath(wanted)), None
    private = Path(tempfile.mkdtemp(prefix="megascope-agent-"))  # mode 0700: only this user enters
    return private / "worker.sock", private


def _bind_socket(server: grpc.aio.Server, path: Path) -> str:
    """Bind ``server`` to the Unix socket ``path`` (mode 0600); its gRPC address."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(f"{path} exists and is not a socket: the agent's worker channel goes there")
        if _listening(path):
            raise OSError(f"another agent serves its ranks on {path}: give this one another --run-dir or --node")
        path.unlink()  # left by an agent that was killed
    address = f"unix:{path}"
    if server.add_insecure_port(address) == 0:
        raise OSError(f"could not listen on the Unix socket {path}")
    os.chmod(path, 0o600)  # only this user's processes may connect (the secret is checked besides)
    return address


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True
