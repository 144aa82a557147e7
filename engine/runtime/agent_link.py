"""The telemetry sink that streams a rank's reports to its node's agent over ``WorkerService.Attach``.

The agent sets ``MEGASCOPE_AGENT_ADDRESS`` (its worker channel: a Unix socket only its user can open, apart from
the public port) and ``MEGASCOPE_AGENT_SECRET`` (a per-job secret, sent as call metadata; the agent refuses a
worker call without it) for the ranks it launches. Training must never depend on the
agent: ``write_step``/``write_event``/``write_signal`` only put the message on a bounded queue; a connection
thread owns the gRPC stream and reconnects with backoff. While the agent is absent or the queue is full, messages are
dropped and counted. A heartbeat goes up every second the stream is idle, so the agent can tell a live rank
that is slow from a dead one.

Up the stream: step reports, heartbeats, events (for people) and the lifecycle signals the agent acts on
(``finished``, ``failure``, ``self_check``, ``command_ack``: see :meth:`AgentSink.write_signal`). Down it:
``Command`` messages, handed to ``on_command`` on this sink's thread (the trainer applies them at a step
boundary and answers each with a ``CommandAck``).
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from megascope.engine.runtime.telemetry import Event, Signal, StepReport
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2, worker_pb2_grpc

AGENT_ADDRESS_ENV = "MEGASCOPE_AGENT_ADDRESS"
AGENT_SECRET_ENV = "MEGASCOPE_AGENT_SECRET"
"""The per-job secret the agent hands the ranks it launches; sent with every WorkerService call."""
SECRET_METADATA_KEY = "x-megascope-worker-secret"
"""The call metadata key that carries the secret (gRPC keys are lower case)."""


def secret_metadata(secret: str) -> tuple[tuple[str, str], ...]:
    """The metadata of a WorkerService call: the secret when there is one."""
    return ((SECRET_METADATA_KEY, secret),) if secret else ()


AB_STEPS_ENV = "MEGASCOPE_AGENT_SINK_AB_STEPS"
"""For measuring this sink's cost (bench/telemetry_overhead.py): with N set, step reports of steps in odd
blocks of N steps (N..2N-1, 3N..4N-1, ...) are not sent, so one run holds both conditions, interleaved."""
_HEARTBEAT_SECONDS = 1.0
_BACKOFF_START_SECONDS = 0.25
_BACKOFF_MAX_SECONDS = 5.0


class AgentSink:
    """Streams step reports, events and heartbeats to the local agent; see the module docstring."""

    def __init__(
        self,
        address: str,
        hello: worker_pb2.Hello,
        on_command: Callable[[worker_pb2.Command], None] | None = None,
        capacity: int = 1024,
        ab_block_steps: int = 0,
        collectives_issued: Callable[[], int] | None = None,
        secret: str = "",
    ) -> None:
        self._address = address
        self._metadata = secret_metadata(secret)
        self._collectives_issued = collectives_issued
        self._ab_block_steps = ab_block_steps
        self._hello = hello
        self._on_command = on_command
        self._capacity = capacity
        # One queue per connection attempt: a request generator of a dead stream may linger on gRPC's
        # thread, and must not take messages meant for the live one.
        self._outbox: queue.Queue[worker_pb2.AttachRequest | None] = queue.Queue(maxsize=capacity)
        """What waits to be sent; a None is :meth:`close` waking the stream's generator to end it at once."""
        self._connected = threading.Event()
        self._closing = threading.Event()
        self._last_step = 0
        self._call: grpc.Future | None = None
        self.dropped = 0
        """Messages dropped because the agent was unreachable or the queue was full."""
        self.connects = 0
        self._thread = threading.Thread(target=self._run, name="megascope-agent-sink", daemon=True)
        self._thread.start()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def write_step(self, report: StepReport) -> None:
        self._last_step = report.step
        if self._ab_block_steps and (report.step // self._ab_block_steps) % 2 == 1:
            return
        self._offer(worker_pb2.AttachRequest(step_report=report))

    def write_event(self, event: Event) -> None:
        self._offer(worker_pb2.AttachRequest(event=event))

    def write_signal(self, signal: Signal) -> None:
        """A lifecycle message, as the Attach payload its type names."""
        if isinstance(signal, worker_pb2.RankFinished):
            request = worker_pb2.AttachRequest(finished=signal)
        elif isinstance(signal, worker_pb2.ExitReport):
            request = worker_pb2.AttachRequest(failure=signal)
        elif isinstance(signal, worker_pb2.SelfCheckResult):
            request = worker_pb2.AttachRequest(self_check=signal)
        elif isinstance(signal, worker_pb2.CommandAck):
            request = worker_pb2.AttachRequest(command_ack=signal)
        else:
            raise TypeError(f"write_signal: {type(signal).__name__} is not a lifecycle signal")
        self._offer(request)

    def write_progress(self, progress: worker_pb2.ProcessProgress) -> None:
        """A rank guard's view of its rank's progress (engine/runtime/rank_guard.py)."""
        self._offer(worker_pb2.AttachRequest(progress=progress))

    def _offer(self, message: worker_pb2.AttachRequest) -> None:
        if not self._connected.is_set():
            self.dropped += 1
            return
        try:
            self._outbox.put_nowait(message)
        except queue.Full:
            self.dropped += 1

    def _requests(self, outbox: queue.Queue[worker_pb2.AttachRequest | None]) -> Iterator[worker_pb2.AttachRequest]:
        # Runs on gRPC's thread: Hello first, then queued messages, a heartbeat whenever idle for a second.
        yield worker_pb2.AttachRequest(hello=self._hello)
        while outbox is self._outbox and (not self._closing.is_set() or not outbox.empty()):
            try:
                message = outbox.get(timeout=_HEARTBEAT_SECONDS)
            except queue.Empty:
                if self._closing.is_set() or outbox is not self._outbox:
                    return
                yield worker_pb2.AttachRequest(
                    heartbeat=telemetry_pb2.Heartbeat(
                        node=self._hello.node,
                        rank=self._hello.rank,
                        wall_time=time.time(),
                        step=self._last_step,
                        pid=self._hello.pid,
                        completed_step=self._last_step,
                        # Read from another thread without a lock: a plain int, and a stale value by one is fine.
                        collectives_issued=self._collectives_issued() if self._collectives_issued else 0,
                    )
                )
                continue
            if message is not None:
                yield message

    def _run(self) -> None:
        backoff = _BACKOFF_START_SECONDS
        while not self._closing.is_set():
            channel = grpc.insecure_channel(self._address)
            self._outbox = queue.Queue(maxsize=self._capacity)
            try:
                call = worker_pb2_grpc.WorkerServiceStub(channel).Attach(
                    self._requests(self._outbox), metadata=self._metadata
                )
                self._call = call
                for response in call:
                    if response.HasField("ack"):
                        self._connected.set()
                        self.connects += 1
                        backoff = _BACKOFF_START_SECONDS
                    elif response.HasField("command") and self._on_command is not None:
                        self._on_command(response.command)
            except grpc.RpcError:
                pass  # the agent went away or refused us; retry below
            finally:
                self._connected.clear()
                self._call = None
                channel.close()
            self._drain_outbox()
            if self._closing.wait(backoff):
                return
            backoff = min(backoff * 2, _BACKOFF_MAX_SECONDS)

    def _drain_outbox(self) -> None:
        while True:
            try:
                message = self._outbox.get_nowait()
            except queue.Empty:
                return
            self.dropped += message is not None

    def close(self, timeout: float = 3.0) -> None:
        """Send what is queued (up to ``timeout``), end the stream and stop reconnecting."""
        deadline = time.monotonic() + timeout
        while self._connected.is_set() and not self._outbox.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._closing.set()
        # The stream's generator may be waiting up to a heartbeat (a second) for a message: wake it, so the stream
        # ends now (a failing rank's exit, and with it its replacement, waits on this). A full outbox needs no wake.
        with contextlib.suppress(queue.Full):
            self._outbox.put_nowait(None)
        self._thread.join(timeout=max(0.1, deadline - time.monotonic()))
        call = self._call
        if call is not None:
            with contextlib.suppress(Exception):
                call.cancel()
        self._thread.join(timeout=1.0)


def connect_from_environment(
    rank: int,
    local_rank: int,
    world_size: int,
    node: str,
    restart_count: int,
    on_command: Callable[[worker_pb2.Command], None] | None = None,
    stack_file: str = "",
    collectives_issued: Callable[[], int] | None = None,
) -> AgentSink | None:
    """An AgentSink when this process was launched by an agent (``MEGASCOPE_AGENT_ADDRESS`` is set; the secret
    from ``MEGASCOPE_AGENT_SECRET``)."""
    address = os.environ.get(AGENT_ADDRESS_ENV)
    if not address:
        return None
    hello = worker_pb2.Hello(
        rank=rank,
        local_rank=local_rank,
        world_size=world_size,
        pid=os.getpid(),
        node=node,
        restart_count=restart_count,
        run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""),
        stack_file=stack_file,
    )
    return AgentSink(
        address,
        hello,
        on_command,
        ab_block_steps=int(os.environ.get(AB_STEPS_ENV, "0")),
        collectives_issued=collectives_issued,
        secret=os.environ.get(AGENT_SECRET_ENV, ""),
    )
