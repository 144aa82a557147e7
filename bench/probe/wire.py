"""Issue 17's probe, the worker channel and the wire: hostile inputs to a real agent server on real sockets.

The agent runs in this process (its gRPC servers, supervision and hang detection as ``megascope agent`` runs them),
with a token, and launched (to its own eyes) a world of two ranks: two child processes of this one stand for them,
so they are its descendants as torchrun's ranks are. Its callers are strangers on the public port, strangers on the
worker socket (without the job's secret, or with a wrong one), and a rank that has the secret but lies.

A case is handled when the agent refused it clearly (the status and a message the caller sees) or absorbed it
(trimmed, paged), changed nothing it should not have, signalled nobody it should not have, and kept serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import psutil

from megascope.agent.merges import MergeRunner
from megascope.agent.processes import is_descendant
from megascope.agent.server import AgentServer
from megascope.agent.state import NodeState
from megascope.agent.supervision import Supervisor
from megascope.agent.validation import Launched
from megascope.engine.runtime.agent_link import secret_metadata
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, telemetry_pb2, worker_pb2, worker_pb2_grpc

from . import Case

CHANNEL = "worker channel"
WIRE = "wire"
TOKEN = "probe-token-0123456789abcdef"
WORLD = 2
LIMIT = 4 << 20
"""A gRPC client's default receive limit: no answer may be larger."""
_RAW = (lambda data: data, lambda data: data)
Check = Callable[[], Awaitable[tuple[bool, str]]]


def _code(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {(error.details() or '')[:160]}"
    return f"{type(error).__name__}: {error}"


class Probe:
    def __init__(self, server: AgentServer, ranks: list[subprocess.Popen[bytes]], stranger: int) -> None:
        self.server = server
        self.ranks = ranks
        self.stranger = stranger
        self.cases: list[Case] = []
        self.public = grpc.aio.insecure_channel(server.address)
        self.workers = grpc.aio.insecure_channel(server.worker_address)
        self.stub = agent_pb2_grpc.AgentServiceStub(self.public)
        self.streams: list[Any] = []
        """Attach streams the probe holds open (the ranks')."""
        self.baseline = time.time()
        """Events from before this are the probe's own doing (a case that stops ranks on purpose)."""

    async def case(self, area: str, name: str, check: Check) -> None:
        try:
            handled, detail = await asyncio.wait_for(check(), 120)
        except Exception as error:  # noqa: BLE001 (a probe reports every failure as a case)
            handled, detail = False, f"probe error: {_code(error)}"
        if handled:  # and it still serves
            try:
                await self.stub.GetSnapshot(agent_pb2.GetSnapshotRequest(), timeout=10)
            except grpc.aio.AioRpcError as error:
                handled, detail = False, f"{detail}; then the agent stopped serving: {_code(error)}"
        self.cases.append(Case(area, name, handled, detail))

    # --- helpers ------------------------------------------------------------------------------------------------

    def secret(self, which: str = "right") -> Any:
        return {
            "none": (),
            "wrong": secret_metadata("not-the-secret"),
            "right": secret_metadata(self.server.worker_secret),
        }[which]

    async def attach(self, channel: grpc.aio.Channel, metadata: Any, *messages: worker_pb2.AttachRequest) -> str:
        """Send messages on an Attach stream; "OK" or the status it ended with."""
        outcome = await self._attach(channel, metadata, *messages)
        if outcome.startswith("INTERNAL: Internal error from Core") and len(messages) > 1:
            # A write raced the agent's end of the call, and the client's library replaced the agent's status with
            # its own: ask again with the first message alone to read what the agent said.
            outcome = await self._attach(channel, metadata, messages[0])
        return outcome

    async def _attach(self, channel: grpc.aio.Channel, metadata: Any, *messages: worker_pb2.AttachRequest) -> str:
        call = worker_pb2_grpc.WorkerServiceStub(channel).Attach(metadata=metadata, timeout=30)
        try:
            for message in messages:  # one by one, and none once the agent has ended the call (its status stands)
                if call.done():
                    break
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.write(message)
            if not call.done():
                with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                    await call.done_writing()
            while await call.read() != grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as error:
            return _code(error)
        return "OK"

    async def report_exit(self, channel: grpc.aio.Channel, metadata: Any, report: worker_pb2.ExitReport) -> str:
        try:
            await worker_pb2_grpc.WorkerServiceStub(channel).ReportExit(
                worker_pb2.ReportExitRequest(report=report), metadata=metadata, timeout=10
            )
        except grpc.aio.AioRpcError as error:
            return _code(error)
        return "OK"

    def untouched(self) -> str | None:
        """What a refused spoof changed, or None: rank 0 and 1 as launched, no incident, world as launched."""
        state = self.server.state
        if set(state.ranks) != {0, 1}:
            return f"ranks are now {sorted(state.ranks)}"
        if [state.ranks[r].pid for r in (0, 1)] != [p.pid for p in self.ranks]:
            return f"pids are now {[state.ranks[r].pid for r in (0, 1)]}"
        if state.node_info.world_size != WORLD:
            return f"world size is now {state.node_info.world_size}"
        kinds = ("crash", "restart", "rank_lost", "peer_failed", "hang", "stalled")
        bad = [e.text for e in state.events if e.kind in kinds and e.wall_time >= self.baseline]
        if bad:
            return f"events: {bad[:2]}"
        incidents = self.server.control._supervisor.incidents  # noqa: SLF001
        if incidents.incident is not None:
            return f"an incident is open: {incidents.incident.kind.value}"
        return None

    async def settle(self) -> None:
        """After a case that disturbed the ranks on purpose: attach them again (a step closes any incident)."""
        self.streams += await _attach_ranks(self)
        await asyncio.sleep(0.3)
        self.baseline = time.time()

    def refused(self, outcome: str, *codes: str) -> tuple[bool, str]:
        changed = self.untouched()
        ok = any(outcome.startswith(code) for code in codes) and changed is None
        return ok, outcome + (f"; changed: {changed}" if changed else "")


def hello(rank: int, world_size: int, pid: int) -> worker_pb2.AttachRequest:
    return worker_pb2.AttachRequest(
        hello=worker_pb2.Hello(rank=rank, local_rank=rank % WORLD, world_size=world_size, pid=pid, node="node0")
    )


def _stranger() -> int:
    """A live process that is not this one's descendant (re-parented at once); SIGUSR1 would kill it."""
    out = subprocess.run(
        ["sh", "-c", "sleep 600 >/dev/null 2>&1 & echo $!"], capture_output=True, text=True, check=True
    )
    return int(out.stdout)


async def _attach_ranks(probe: Probe) -> list[Any]:
    """The two launched ranks' streams: hello, a step each, kept open."""
    calls = []
    for rank, process in enumerate(probe.ranks):
        call = worker_pb2_grpc.WorkerServiceStub(probe.workers).Attach(metadata=probe.secret())
        await call.write(hello(rank, WORLD, process.pid))
        await call.read()
        await call.write(worker_pb2.AttachRequest(step_report=telemetry_pb2.StepReport(rank=rank, step=1)))
        calls.append(call)
    deadline = time.monotonic() + 10
    while (
        not all(s.HasField("last_step") for s in probe.server.state.ranks.values()) or len(probe.server.state.ranks) < 2
    ):
        if time.monotonic() > deadline:
            raise RuntimeError("the probe's ranks did not attach")
        await asyncio.sleep(0.05)
    return calls


async def _probe(workdir: Path) -> list[Case]:
    (workdir / "ckpt").mkdir()
    state = NodeState(telemetry_pb2.NodeInfo(node="node0", start_wall_time=time.time()))
    supervisor = Supervisor(state, hang_timeout=600)
    launched = Launched(
        started=time.time(), world_sizes=(WORLD, WORLD), local_world_size=WORLD, owns_pid=is_descendant,
        running=is_descendant,
    )  # fmt: skip
    server = AgentServer(
        state, "127.0.0.1", 0, token=TOKEN, supervisor=supervisor, ckpt_dir=str(workdir / "ckpt"),
        merges=MergeRunner(state, workdir / "ckpt"),
        worker_socket=workdir / "agent-node0.sock", launched=launched,
    )  # fmt: skip
    await server.start()
    supervisor.start()
    ranks = [subprocess.Popen(["sleep", "600"]) for _ in range(WORLD)]
    stranger = _stranger()
    probe = Probe(server, ranks, stranger)
    try:
        probe.streams += await _attach_ranks(probe)
        await _worker_channel(probe)
        await _sizes(probe)
        await _merges(probe)
        await _garbage_and_oversize(probe)
        await _control(probe)
        await _watchers(probe)
        for call in probe.streams:
            call.cancel()
    finally:
        await probe.public.close()
        await probe.workers.close()
        await supervisor.stop()
        await server.stop(0.5)
        for process in ranks:
            process.kill()
            process.wait()
        with contextlib.suppress(ProcessLookupError):
            os.kill(stranger, signal.SIGKILL)
    return probe.cases


def run(workdir: Path) -> list[Case]:
    return asyncio.run(_probe(workdir))


# --- the worker channel -----------------------------------------------------------------------------------------


async def _worker_channel(probe: Probe) -> None:
    pub, sock = probe.public, probe.workers
    spoof0 = hello(0, 1, 0)
    spoof90 = hello(90, 91, probe.ranks[1].pid)
    beat = worker_pb2.AttachRequest(heartbeat=telemetry_pb2.Heartbeat(rank=-7, wall_time=time.time()))
    forged = worker_pb2.ExitReport(rank=0, pid=probe.ranks[0].pid, exit_code=1, wall_time=4e9)
    stranger, own = probe.stranger, os.getpid()

    async def on(
        channel: grpc.aio.Channel, who: str, *messages: worker_pb2.AttachRequest, codes: tuple[str, ...]
    ) -> tuple[bool, str]:
        return probe.refused(await probe.attach(channel, probe.secret(who), *messages), *codes)

    running = worker_pb2.ExitReport(rank=0, pid=probe.ranks[0].pid, exit_code=1, wall_time=time.time())
    bad, unauth, denied, unknown = (
        ("INVALID_ARGUMENT",),
        ("UNAUTHENTICATED",),
        ("PERMISSION_DENIED",),
        ("UNIMPLEMENTED",),
    )
    cases: list[tuple[str, Check]] = [
        ("public port: Hello rank 0 world 1 pid 0", lambda: on(pub, "none", spoof0, codes=unknown)),
        (
            "public port: Hello rank 90 world 91, Heartbeat rank -7",
            lambda: on(pub, "none", spoof90, beat, codes=unknown),
        ),
        ("socket, no secret: Hello rank 0 world 1 pid 0", lambda: on(sock, "none", spoof0, codes=unauth)),
        (
            "socket, wrong secret: Hello rank 90, Heartbeat rank -7",
            lambda: on(sock, "wrong", spoof90, beat, codes=denied),
        ),
        ("rank with the secret: Hello rank 0 world 1 pid 0", lambda: on(sock, "right", spoof0, codes=bad)),
        ("rank with the secret: Hello rank 90 world 91", lambda: on(sock, "right", spoof90, codes=bad)),
        ("rank with the secret: Heartbeat rank -7 on rank 1's stream", lambda: _heartbeat_on_own_stream(probe, beat)),
        ("public port: ReportExit wall_time 4e9", lambda: _exit(probe, pub, "none", forged, unknown)),
        ("socket, no secret: ReportExit wall_time 4e9", lambda: _exit(probe, sock, "none", forged, unauth)),
        ("rank with the secret: ReportExit wall_time 4e9", lambda: _exit(probe, sock, "right", forged, bad)),
        ("rank with the secret: ReportExit of rank 0 while it runs", lambda: _exit(probe, sock, "right", running, bad)),
        ("rank with the secret: Hello pid = an unrelated process", lambda: _pid_claim(probe, stranger)),
        ("rank with the secret: Hello pid = the agent's own", lambda: _pid_claim(probe, own)),
        ("DumpStacks and SIGKILL with a stranger's pid recorded", lambda: _stacks_signal_nobody(probe)),
    ]
    for name, check in cases:
        await probe.case(CHANNEL, name, check)


async def _exit(probe: Probe, channel: grpc.aio.Channel, who: str, report: worker_pb2.ExitReport,
                codes: tuple[str, ...]) -> tuple[bool, str]:  # fmt: skip
    outcome = await probe.report_exit(channel, probe.secret(who), report)
    await asyncio.sleep(1.2)  # past the wait for a guard's report: a crash would have been named
    return probe.refused(outcome, *codes)


async def _heartbeat_on_own_stream(probe: Probe, beat: worker_pb2.AttachRequest) -> tuple[bool, str]:
    """Rank 1's process attaches again (as after a reconnect) and sends a heartbeat for rank -7."""
    outcome = await probe.attach(probe.workers, probe.secret(), hello(1, WORLD, probe.ranks[1].pid), beat)
    state = probe.server.state
    ok = outcome.startswith("INVALID_ARGUMENT") and "heartbeat.rank" in outcome
    ok = ok and set(state.ranks) == {0, 1} and state.node_info.world_size == WORLD
    await probe.settle()  # its stream ended without finishing: rank 1 lost, as it should be; attach it again
    return ok, outcome


async def _pid_claim(probe: Probe, pid: int) -> tuple[bool, str]:
    outcome = await probe.attach(probe.workers, probe.secret(), hello(0, WORLD, pid))
    ok, detail = probe.refused(outcome, "INVALID_ARGUMENT")
    return ok and psutil.pid_exists(pid), detail


async def _stacks_signal_nobody(probe: Probe) -> tuple[bool, str]:
    state = probe.server.state
    # As if the agent had recorded the stranger's pid for a third rank (a pid that changed hands since).
    state.ranks[5] = telemetry_pb2.RankStatus(rank=5, pid=probe.stranger, state=telemetry_pb2.RANK_STATE_RUNNING)
    state.stack_files[5] = "/dev/null"
    try:
        response = await probe.stub.DumpStacks(
            agent_pb2.DumpStacksRequest(timeout_seconds=2), metadata=(("authorization", f"Bearer {TOKEN}"),)
        )
        killed = probe.server.control._supervisor.stop_ranks("for the hang")  # noqa: SLF001 (the hang route: SIGKILL)
    finally:
        del state.ranks[5], state.stack_files[5]
        state.node_info.ranks[:] = sorted(state.ranks)
    await asyncio.sleep(0.5)
    alive = psutil.pid_exists(probe.stranger) and psutil.Process(probe.stranger).status() != psutil.STATUS_ZOMBIE
    methods = {r.rank: r.method for r in response.ranks}
    # The launched ranks were SIGKILLed (they are the agent's): start them again for the later cases.
    for index, process in enumerate(probe.ranks):
        process.wait()
        probe.ranks[index] = subprocess.Popen(["sleep", "600"])
    await probe.settle()
    ok = alive and methods.get(5) == "not a process of this agent" and killed == WORLD
    return ok, f"stranger alive: {alive}; stacks: {methods}; SIGKILL sent to {killed} launched rank(s)"


# --- sizes ------------------------------------------------------------------------------------------------------


async def _sizes(probe: Probe) -> None:
    async def seventy_events() -> tuple[bool, str]:
        before = probe.server.state.history_bytes
        call = worker_pb2_grpc.WorkerServiceStub(probe.workers).Attach(metadata=probe.secret())
        await call.write(hello(0, WORLD, probe.ranks[0].pid))  # rank 0's stream, again (the real one)
        await call.read()
        for i in range(70):
            event = telemetry_pb2.Event(kind="spam", text=f"{i} " + "x" * 1_000_000, wall_time=time.time())
            await call.write(worker_pb2.AttachRequest(event=event))
        deadline = time.monotonic() + 60
        while sum(e.kind == "spam" for e in probe.server.state.events) < 70 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        grown = probe.server.state.history_bytes - before
        sizes = await _answer_sizes(probe)
        await call.write(worker_pb2.AttachRequest(step_report=telemetry_pb2.StepReport(rank=0, step=2)))
        probe.streams.append(call)
        ok = grown < 1 << 20 and max(sizes.values()) < LIMIT
        return ok, f"history grew {grown / 1e6:.2f} MB; answers: " + ", ".join(
            f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items()
        )

    async def big_history() -> tuple[bool, str]:
        for i in range(150):
            probe.server.state.event(f"big {i} " + "z" * 60_000, kind="big")
        sizes = await _answer_sizes(probe)
        return max(sizes.values()) < LIMIT, ", ".join(f"{k} {v / 1e6:.2f} MB" for k, v in sizes.items())

    await probe.case(WIRE, "70 events of 1 MB from a rank", seventy_events)
    await probe.case(WIRE, "9 MB of events in the agent's history: every answer under 4 MiB", big_history)


async def _answer_sizes(probe: Probe) -> dict[str, int]:
    """The largest message of each reading answer, read with a client's default limit (4 MiB)."""
    sizes = {"GetSnapshot": (await probe.stub.GetSnapshot(agent_pb2.GetSnapshotRequest(), timeout=30)).ByteSize()}
    sizes["GetEvents"] = (await probe.stub.GetEvents(agent_pb2.GetEventsRequest(), timeout=30)).ByteSize()
    largest = 0
    async for response in probe.stub.Watch(agent_pb2.WatchRequest(), timeout=60):
        largest = max(largest, response.ByteSize())
        if not response.telemetry.backfill:
            break
    sizes["Watch"] = largest
    return sizes


# --- merges -----------------------------------------------------------------------------------------------------


async def _merges(probe: Probe) -> None:
    token = (("authorization", f"Bearer {TOKEN}"),)

    def merge(steps: range, code: str, says: str) -> Check:
        async def check() -> tuple[bool, str]:
            start = time.monotonic()
            try:
                async for _ in probe.stub.StartMerge(
                    agent_pb2.StartMergeRequest(method="sma", steps=steps), metadata=token, timeout=60
                ):
                    pass
            except grpc.aio.AioRpcError as error:
                took = time.monotonic() - start
                details = error.details() or ""
                ok = error.code().name == code and says in details and len(details) <= 1024 and took < 5
                return ok, f"{error.code().name} in {took:.2f}s, {len(details)} chars: {details[:100]}"
            return False, "the merge started"

        return check

    await probe.case(WIRE, "StartMerge with 10,000 steps", merge(range(1, 10_001), "INVALID_ARGUMENT", "at most"))
    await probe.case(WIRE, "StartMerge with 20,000 steps", merge(range(1, 20_001), "INVALID_ARGUMENT", "at most"))
    await probe.case(
        WIRE, "StartMerge with 1,000 missing steps", merge(range(10**9, 10**9 + 1000), "NOT_FOUND", "no committed")
    )


# --- garbage, oversize, control, watchers ------------------------------------------------------------------------


def _all_methods() -> list[tuple[str, str, bool, bool]]:
    found = []
    for file, service in ((agent_pb2, "AgentService"), (worker_pb2, "WorkerService")):
        for method in file.DESCRIPTOR.services_by_name[service].methods:
            found.append(
                (service, f"/megascope.v1.{service}/{method.name}", method.client_streaming, method.server_streaming)
            )
    return found


async def _raw(channel: grpc.aio.Channel, path: str, streams: tuple[bool, bool], data: bytes, metadata: Any) -> str:
    client_streams, server_streams = streams
    try:
        if client_streams:
            async for _ in channel.stream_stream(path, *_RAW)(iter([data]), metadata=metadata, timeout=30):
                pass
        elif server_streams:
            call = channel.unary_stream(path, *_RAW)(data, metadata=metadata, timeout=30)
            await call.read()
            call.cancel()
            return "OK"
        else:
            await channel.unary_unary(path, *_RAW)(data, metadata=metadata, timeout=30)
    except grpc.aio.AioRpcError as error:
        return _code(error)
    return "OK"


async def _garbage_and_oversize(probe: Probe) -> None:
    rng = random.Random(17)
    token = (("authorization", f"Bearer {TOKEN}"),)
    targets = [(probe.public, token, "public")]
    targets += [(probe.workers, probe.secret(), "socket")]
    # Bytes that are no message of any type (a malformed tag, a length past the end), so none of them is a valid
    # control request in disguise: 4 to each method, on each listener that serves it.
    garbage = [b"\xff\xff\xff", b"\x0a\xff\xff\xff\xff\x0f", b"\xff" * 11 + rng.randbytes(64), b"\x0a\x05ab"]
    for service, path, client_streams, server_streams in _all_methods():
        for channel, metadata, where in targets:
            if where == "socket" and service != "WorkerService":
                continue
            for data in garbage:

                async def check(
                    channel=channel, path=path, data=data, metadata=metadata, kind=(client_streams, server_streams)
                ) -> tuple[bool, str]:
                    outcome = await _raw(channel, path, kind, data, metadata)
                    ok = outcome.startswith(("INVALID_ARGUMENT", "UNIMPLEMENTED"))
                    return ok, outcome

                await probe.case(WIRE, f"garbage ({len(data)} bytes) to {path} on the {where}", check)
    for service, path, client_streams, server_streams in _all_methods():
        channel, metadata = (probe.public, token) if service == "AgentService" else (probe.workers, probe.secret())

        async def oversize(
            channel=channel, path=path, metadata=metadata, kind=(client_streams, server_streams)
        ) -> tuple[bool, str]:
            outcome = await _raw(channel, path, kind, b"\x0a\xff\xff\xff\x03" + b"a" * (3 << 20), metadata)
            return outcome.startswith("RESOURCE_EXHAUSTED"), outcome

        await probe.case(WIRE, f"3 MB request to {path}", oversize)


async def _control(probe: Probe) -> None:
    stub = probe.stub
    merge = agent_pb2.StartMergeRequest(method="sma", last=2)
    calls: list[tuple[str, Callable[[Any], Awaitable[Any]]]] = [
        ("SaveCheckpoint", lambda md: stub.SaveCheckpoint(agent_pb2.SaveCheckpointRequest(), metadata=md, timeout=10)),
        ("Restart", lambda md: stub.Restart(agent_pb2.RestartRequest(), metadata=md, timeout=10)),
        ("DumpStacks", lambda md: stub.DumpStacks(agent_pb2.DumpStacksRequest(), metadata=md, timeout=10)),
        ("CancelMerge", lambda md: stub.CancelMerge(agent_pb2.CancelMergeRequest(), metadata=md, timeout=10)),
        ("StartMerge", lambda md: _drain(stub.StartMerge(merge, metadata=md, timeout=10))),
    ]
    for name, call in calls:
        for label, metadata, code in [
            ("no token", (), "UNAUTHENTICATED"),
            ("a wrong token", (("authorization", "Bearer wrong"),), "PERMISSION_DENIED"),
            ("a malformed header", (("authorization", TOKEN),), "PERMISSION_DENIED"),
        ]:

            async def check(call=call, metadata=metadata, code=code) -> tuple[bool, str]:
                try:
                    await call(metadata)
                except grpc.aio.AioRpcError as error:
                    return probe.refused(_code(error), code)
                return False, "served"

            await probe.case(WIRE, f"{name} with {label}", check)


async def _drain(call: Any) -> None:
    async for _ in call:
        pass


async def _watchers(probe: Probe) -> None:
    async def many() -> tuple[bool, str]:
        rss = psutil.Process().memory_info().rss
        channels = [grpc.aio.insecure_channel(probe.server.address) for _ in range(20)]
        streams = []
        try:
            for i in range(400):
                stub = agent_pb2_grpc.AgentServiceStub(channels[i % len(channels)])
                streams.append(stub.Watch(agent_pb2.WatchRequest(backfill_seconds=3600)))
            for stream in streams[:200]:  # half read their back-fill; the other half never read
                await stream.read()
            start = time.monotonic()
            await probe.stub.GetSnapshot(agent_pb2.GetSnapshotRequest(), timeout=30)
            took = time.monotonic() - start
            grown = psutil.Process().memory_info().rss - rss
            return True, (
                f"GetSnapshot answered in {took:.2f}s with 400 streams open (back-fill of 3600 s: 9 MB of events); "
                f"this process (agent and clients) grew {grown / 1e6:.0f} MB"
            )
        finally:
            for stream in streams:
                stream.cancel()
            for channel in channels:
                await channel.close()

    await probe.case(WIRE, "200 reading and 200 never-reading Watch streams", many)
