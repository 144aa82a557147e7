"""The dashboard (Pilot) against the real agent: a subprocess that trains the tiny preset on this machine."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support import REPO
from support.tui import SIZE, cell, until

from megascope.dashboard.app import DashboardApp

# -- against the real agent (a subprocess that trains the tiny preset on this machine) ----------------------


@pytest.fixture
def real_agent(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """``megascope agent`` on a free port; yields the process and its address, SIGTERMs it at the end."""
    out, err = tmp_path / "agent.out", tmp_path / "agent.err"
    command = [
        sys.executable, "-m", "megascope.agent.cli", "agent", "--port", "0", "--nproc-per-node", "1",
        "--preset", "tiny", "--steps", "40", "--batch-tokens", "512", "--run-dir", str(tmp_path / "run"),
    ]  # fmt: skip
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1")
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            first = out.read_text().partition("\n")
            if first[1]:
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"agent did not start (exit {proc.poll()}):\n{err.read_text()[-3000:]}")
            time.sleep(0.1)
        match = re.fullmatch(r"megascope agent: listening on (\S+:\d+)", first[0])
        assert match, f"unexpected first line from the agent: {first[0]!r}"
        yield proc, match.group(1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def test_real_agent_ranks_appear_with_steps(real_agent: tuple[subprocess.Popen[bytes], str]) -> None:
    _, address = real_agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: cell(app, "ranks", "0", "step") not in ("", "-"), "rank 0 reports", 120)
        assert cell(app, "nodes", address, "connection") == "CONNECTED"
        assert cell(app, "ranks", "0", "status") in ("RUNNING", "EXITED")


async def test_real_agent_sigterm_marks_the_node_disconnected(
    real_agent: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, address = real_agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: cell(app, "nodes", address, "connection") == "CONNECTED", "connected", 120)
        await until(pilot, lambda: cell(app, "ranks", "0", "rank") == "0", "rank 0 listed", 120)
        os.kill(proc.pid, signal.SIGTERM)
        await until(
            pilot, lambda: cell(app, "nodes", address, "connection").startswith("DISCONNECTED"), "DISCONNECTED", 60
        )
        assert cell(app, "ranks", "0", "status") == "DISCONNECTED"
        assert app.is_running
