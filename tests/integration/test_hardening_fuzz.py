"""Issue 17's fuzz test: random bytes and random valid-but-hostile messages to every method of both services of a
real agent that trains a real job, for a bounded time; then the agent still serves and the job still trains.

Hostile callers: anyone on the public port (no token, or a wrong one: the agent runs with a token), anyone on the
worker socket without the job's secret or with a wrong one, and a caller that has the secret (read from a rank's
environment, as a compromised rank would have it) but sends lies: made-up pids and ranks, times from the future,
huge texts. What is asserted is behaviour (the agent answers, no incident was opened, the step count goes on
rising), never how fast.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import REPO

from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV, AGENT_SECRET_ENV, secret_metadata
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc, worker_pb2

FUZZ_SECONDS = 20.0
TOKEN = "fuzz-test-token-" + "x" * 16
_CLIENT_CORE_ERROR = "Internal error from Core"
_INTS = (0, 1, -1, -7, 2, 90, 2**31 - 1, -(2**31))
_FLOATS = (0.0, -1.0, 1e-9, 4e9, float("nan"), float("inf"), -float("inf"), 1e308)
_STRINGS = ("", "x", "../../etc/passwd", "/proc/self/environ", "\x00\xff", "ranks " * 50)


class Fuzzer:
    """Random requests: bytes, or messages of a method's request type with hostile field values."""

    def __init__(self, seed: int, avoid_pids: set[int]) -> None:
        self.random = random.Random(seed)
        self.avoid_pids = avoid_pids
        """The real ranks' pids: a made-up Hello must not name one (that would be a rank, not a stranger)."""

    def payload(self, descriptor: Descriptor) -> bytes:
        if self.random.random() < 0.4:
            return self.random.randbytes(self.random.choice((0, 1, 3, 17, 200, 5000)))
        data = self.message(descriptor).SerializeToString()
        return data[: 2 << 20]  # past the agent's 1 MiB limit, and no bigger: cut, it is garbage too

    def message(self, descriptor: Descriptor, depth: int = 0) -> Message:
        from google.protobuf import message_factory

        message = message_factory.GetMessageClass(descriptor)()
        for field in descriptor.fields:
            if self.random.random() < 0.4 or (field.containing_oneof and self.random.random() < 0.7):
                continue
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 3 or field.message_type.GetOptions().map_entry:
                    continue
                if field.is_repeated:
                    for _ in range(self.random.choice((1, 2, 5))):
                        getattr(message, field.name).add().CopyFrom(self.message(field.message_type, depth + 1))
                else:
                    getattr(message, field.name).CopyFrom(self.message(field.message_type, depth + 1))
                continue
            count = self.random.choice((1, 3, 1500)) if field.is_repeated else 1
            values = [self.scalar(field, short=count > 3) for _ in range(count)]
            try:
                if field.is_repeated:
                    getattr(message, field.name).extend(values)
                else:
                    setattr(message, field.name, values[0])
            except (TypeError, ValueError):
                pass  # a value out of the field's range: leave it unset
        if descriptor.name in ("Hello", "Heartbeat", "ExitReport") and message.pid in self.avoid_pids:  # type: ignore[attr-defined]
            message.pid = 0  # type: ignore[attr-defined]
        return message

    def scalar(self, field: FieldDescriptor, short: bool = False) -> Any:
        pick = self.random.choice
        if field.type in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
            return pick((*_FLOATS, time.time(), time.time() + 3600, self.random.uniform(-1e6, 1e6)))
        if field.type == FieldDescriptor.TYPE_BOOL:
            return pick((True, False))
        if field.type == FieldDescriptor.TYPE_STRING:
            return pick((*_STRINGS, "y" * self.random.choice((10, 500) if short else (10, 5000, 300_000))))
        if field.type == FieldDescriptor.TYPE_BYTES:
            return self.random.randbytes(pick((0, 10, 1000)))
        if field.type == FieldDescriptor.TYPE_ENUM:
            return pick((0, 1, 2, 3, 42, -1))
        return pick((*_INTS, self.random.randrange(-(10**6), 10**6), os.getpid(), os.getppid()))


def methods(service: Any) -> list[tuple[str, Descriptor, bool, bool]]:
    """(path, request type, client streams, server streams) of every method of a service."""
    return [
        (f"/{service.full_name}/{m.name}", m.input_type, m.client_streaming, m.server_streaming)
        for m in service.methods
    ]


AGENT_METHODS = methods(agent_pb2.DESCRIPTOR.services_by_name["AgentService"])
WORKER_METHODS = methods(worker_pb2.DESCRIPTOR.services_by_name["WorkerService"])


async def call(channel: grpc.aio.Channel, method: tuple[str, Descriptor, bool, bool], fuzzer: Fuzzer,
               metadata: tuple[tuple[str, str], ...]) -> str:  # fmt: skip
    """One call with random input; its status code's name (responses read a few, then dropped)."""
    path, request_type, client_streams, server_streams = method
    identity = lambda data: data  # noqa: E731 (raw bytes both ways)
    try:
        async with asyncio.timeout(5):
            if client_streams:
                count = fuzzer.random.choice((1, 2, 5))
                requests = [fuzzer.payload(request_type) for _ in range(count)]
                if fuzzer.random.random() < 0.5:  # a well-formed message first, then whatever
                    first = worker_pb2.AttachRequest(hello=fuzzer.message(worker_pb2.Hello.DESCRIPTOR))
                    requests.insert(0, first.SerializeToString())
                # Written one by one, stopping once the agent has ended the call.
                stream = channel.stream_stream(path, identity, identity)(metadata=metadata)
                for request in requests:
                    if stream.done():
                        break
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await stream.write(request)
                if not stream.done():
                    with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
                        await stream.done_writing()
                while await stream.read() != grpc.aio.EOF:
                    pass
            elif server_streams:
                stream = channel.unary_stream(path, identity, identity)(fuzzer.payload(request_type), metadata=metadata)
                for _ in range(3):
                    if await stream.read() == grpc.aio.EOF:
                        break
                stream.cancel()
            else:
                await channel.unary_unary(path, identity, identity)(fuzzer.payload(request_type), metadata=metadata)
    except grpc.aio.AioRpcError as error:
        if error.code() == grpc.StatusCode.INTERNAL and error.details() == _CLIENT_CORE_ERROR:
            # A write that raced the agent's end of the call: the client's library replaces the agent's status.
            return "ENDED_WHILE_WRITING"
        return error.code().name
    except TimeoutError:
        return "TIMEOUT"
    return "OK"


@pytest.fixture
def trained_agent(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], str]]:
    """A real agent training a real (tiny) job for as long as the test needs, with a token."""
    env = dict(os.environ, MEGASCOPE_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
    agent = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--node", "node0",
         "--run-dir", str(tmp_path / "run"), "--steps", "100000", "--batch-tokens", "256", "--val-every", "0",
         "--no-self-check"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=REPO, env=env,
    )  # fmt: skip
    try:
        assert agent.stdout is not None
        line = agent.stdout.readline()
        assert "listening on" in line, line
        yield agent, line.strip().rsplit(" ", 1)[-1]
    finally:
        if agent.poll() is None:
            agent.send_signal(signal.SIGTERM)
            try:
                agent.wait(timeout=60)
            except subprocess.TimeoutExpired:
                for child in psutil.Process(agent.pid).children(recursive=True):
                    child.kill()
                agent.kill()
                agent.wait()


async def snapshot(address: str) -> agent_pb2.GetSnapshotResponse:
    async with grpc.aio.insecure_channel(address) as channel:
        return await agent_pb2_grpc.AgentServiceStub(channel).GetSnapshot(agent_pb2.GetSnapshotRequest(), timeout=10)


async def newest_step(address: str) -> int:
    ranks = (await snapshot(address)).rank_statuses
    return max((r.last_step for r in ranks if r.HasField("last_step")), default=0)


async def wait_for_step_past(address: str, step: int, timeout: float = 240.0) -> int:
    deadline = time.monotonic() + timeout
    while (now := await newest_step(address)) <= step:
        assert time.monotonic() < deadline, f"training did not get past step {step}"
        await asyncio.sleep(0.5)
    return now


def rank_environment(agent_pid: int) -> tuple[str, str, set[int]]:
    """The worker channel and the secret, as a rank's environment holds them; and every pid of the job."""
    processes = psutil.Process(agent_pid).children(recursive=True)
    for process in processes:
        with_secret = process.environ()
        if AGENT_SECRET_ENV in with_secret:
            return with_secret[AGENT_ADDRESS_ENV], with_secret[AGENT_SECRET_ENV], {p.pid for p in processes}
    raise AssertionError("no process of the job carries the secret")


async def test_fuzzing_both_services_leaves_the_agent_serving_and_the_job_training(
    trained_agent: tuple[subprocess.Popen[str], str],
) -> None:
    agent, address = trained_agent
    await wait_for_step_past(address, 0)
    worker_address, secret, job_pids = rank_environment(agent.pid)
    assert worker_address.startswith("unix:")
    fuzzer = Fuzzer(seed=17, avoid_pids=job_pids | {agent.pid})
    outcomes: dict[str, Counter[str]] = {}
    public = grpc.aio.insecure_channel(address)
    workers = grpc.aio.insecure_channel(worker_address)
    bad_token = (("authorization", "Bearer wrong"),)
    targets = [(public, m, (), bad_token) for m in AGENT_METHODS + WORKER_METHODS]
    targets += [(workers, m, (), secret_metadata("wrong"), secret_metadata(secret)) for m in WORKER_METHODS]
    deadline = time.monotonic() + FUZZ_SECONDS
    try:
        while time.monotonic() < deadline:
            for channel, method, *metadatas in targets:
                code = await call(channel, method, fuzzer, fuzzer.random.choice(metadatas))
                where = "worker" if channel is workers else "public"
                outcomes.setdefault(f"{where} {method[0]}", Counter())[code] += 1
    finally:
        await public.close()
        await workers.close()

    every = {f"public {m[0]}" for m in AGENT_METHODS + WORKER_METHODS} | {f"worker {m[0]}" for m in WORKER_METHODS}
    assert set(outcomes) == every and all(sum(c.values()) >= 3 for c in outcomes.values()), outcomes
    for method in ("SaveCheckpoint", "Restart", "DumpStacks", "StartMerge", "CancelMerge"):
        assert "OK" not in outcomes[f"public /megascope.v1.AgentService/{method}"], outcomes  # never without the token
    for method in WORKER_METHODS:
        # Not on the public port at all (a request past the size limit may be refused for that first).
        allowed = {"UNIMPLEMENTED", "RESOURCE_EXHAUSTED", "ENDED_WHILE_WRITING"}
        assert set(outcomes[f"public {method[0]}"]) <= allowed and "UNIMPLEMENTED" in outcomes[f"public {method[0]}"]
    codes = {code for counter in outcomes.values() for code in counter}
    assert not codes & {"TIMEOUT", "UNKNOWN", "INTERNAL", "UNAVAILABLE"}, outcomes  # every call got a clear answer

    # Still serving, health and all, and the job goes on training: no incident was opened, nothing was stopped.
    async with grpc.aio.insecure_channel(address) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        events = await agent_pb2_grpc.AgentServiceStub(channel).GetEvents(agent_pb2.GetEventsRequest(), timeout=10)
    after_fuzz = await newest_step(address)
    await wait_for_step_past(address, after_fuzz)
    assert agent.poll() is None
    kinds = {e.kind for e in events.events}
    assert not kinds & {"crash", "hang", "stalled", "restart", "restart_requested", "rank_lost", "peer_failed"}, kinds
    info = (await snapshot(address)).node_info
    assert info.world_size == 1 and list(info.ranks) == [0]
    assert all(math.isfinite(e.wall_time) and e.wall_time <= time.time() + 60 for e in events.events)
