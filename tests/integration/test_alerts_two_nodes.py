"""Two nodes, one crash: exactly one agent posts it (the culprit's) and exactly one posts the restart (rank 0's)."""

from __future__ import annotations

import socket
import time
import uuid
from contextlib import ExitStack
from pathlib import Path

import pytest
from support.ops import running_agent, webhook_receiver

pytestmark = pytest.mark.slow


def test_a_crash_on_one_node_of_two_is_alerted_once_and_so_is_its_restart(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        rendezvous = f"127.0.0.1:{sock.getsockname()[1]}"
    job = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-endpoint", rendezvous, "--rdzv-id", uuid.uuid4().hex[:8],
           "--steps", "8", "--max-restarts", "1", "--inject", "crash:rank=1,step=3", "--exit-when-done"]  # fmt: skip
    with webhook_receiver() as hook, ExitStack() as stack:
        agents = [
            stack.enter_context(running_agent(tmp_path / node, *job, "--alert-webhook", hook.url, node=node))
            for node in ("node0", "node1")
        ]
        for agent in agents:
            assert agent.process.wait(300) == 0, "".join(agent.lines)
        deadline = time.monotonic() + 30
        while not hook.bodies("restart") and time.monotonic() < deadline:
            time.sleep(0.2)
    crashes, restarts = hook.bodies("crash"), hook.bodies("restart")
    assert [body["rank"] for body in crashes] == [1], hook.received
    assert len(restarts) == 1, hook.received
    assert {body["kind"] for body in hook.received} == {"crash", "restart"}  # peer failures and stalls page no one
