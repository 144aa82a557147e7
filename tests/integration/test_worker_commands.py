"""A real training rank on its Attach stream: commands down it (acked by id), lifecycle messages up it."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
from support import run_megascope

from megascope.engine.checkpoint import committed_steps
from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV
from megascope.protos.megascope.v1 import worker_pb2, worker_pb2_grpc


class ScriptedAgent(worker_pb2_grpc.WorkerServiceServicer):
    """Records what the rank sends; once it reports step ``at_step``, sends ``commands`` down its stream."""

    def __init__(self, at_step: int, commands: list[worker_pb2.Command]) -> None:
        self.at_step = at_step
        self.commands = commands
        self.received: list[worker_pb2.AttachRequest] = []

    def Attach(  # noqa: N802 - the gRPC method name
        self, request_iterator: Iterator[worker_pb2.AttachRequest], context: grpc.ServicerContext
    ) -> Iterator[worker_pb2.AttachResponse]:
        outbox: queue.Queue[worker_pb2.AttachResponse | None] = queue.Queue()

        def read() -> None:
            guard = False  # the rank guard's own stream (its output and exit), not the rank's: not recorded
            for request in request_iterator:
                kind = request.WhichOneof("payload")
                guard = guard or (kind == "hello" and request.hello.role == worker_pb2.WORKER_ROLE_GUARD)
                if not guard:
                    self.received.append(request)
                if kind == "hello":
                    outbox.put(worker_pb2.AttachResponse(ack=worker_pb2.Ack(node=request.hello.node)))
                elif kind == "step_report" and request.step_report.step == self.at_step:
                    for command in self.commands:
                        outbox.put(worker_pb2.AttachResponse(command=command))
            outbox.put(None)

        threading.Thread(target=read, daemon=True).start()
        while (response := outbox.get()) is not None:
            yield response

    def of(self, kind: str) -> list[Any]:
        """The payloads of one kind the rank sent ("step_report", "finished", ...), in order."""
        return [getattr(r, kind) for r in self.received if r.WhichOneof("payload") == kind]


def test_a_rank_acks_each_command_saves_where_asked_and_stops_cleanly_where_asked(tmp_path: Path) -> None:
    checkpoint = worker_pb2.COMMAND_KIND_CHECKPOINT
    agent = ScriptedAgent(
        at_step=4,
        commands=[
            worker_pb2.Command(id="save", kind=checkpoint, step=8),
            worker_pb2.Command(id="late", kind=checkpoint, step=2),
            worker_pb2.Command(id="stop", kind=worker_pb2.COMMAND_KIND_STOP, step=12),
        ],
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    worker_pb2_grpc.add_WorkerServiceServicer_to_server(agent, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    os.environ[AGENT_ADDRESS_ENV] = f"127.0.0.1:{port}"
    try:
        result = run_megascope(
            "train", "--preset", "tiny", "--steps", "40", "--batch-tokens", "256", "--val-every", "0",
            "--no-self-check", "--run-dir", str(tmp_path / "run"), "--ckpt-dir", str(tmp_path / "ckpt"), timeout=180,
        )  # fmt: skip
    finally:
        del os.environ[AGENT_ADDRESS_ENV]
        server.stop(grace=1)
    assert result.returncode == 0, result.stderr[-2000:]

    acks = {ack.command_id: ack for ack in agent.of("command_ack")}
    assert (acks["save"].ok, acks["save"].message) == (True, "will save after step 8")
    assert (acks["late"].ok, acks["late"].message) == (False, "the request to save step 2 came too late")
    assert (acks["stop"].ok, acks["stop"].message) == (True, "will stop after step 12")
    assert committed_steps(tmp_path / "ckpt") == [8, 12]  # the requested step, and the last one (where it stopped)
    assert max(report.step for report in agent.of("step_report")) == 12
    (finished,) = agent.of("finished")
    assert finished.steps == 12
    assert agent.received[-1].WhichOneof("payload") == "finished"  # the last word on the stream
    assert not agent.of("failure")
