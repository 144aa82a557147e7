"""A real ``megascope agent --no-launch`` in a subprocess: what generic clients, the laptop venv and profiles test
against."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Mapping

from support import REPO


class AgentProcess:
    """``megascope agent --no-launch --port 0 FLAGS`` (run with ``python`` of this environment), its address read
    from its first line. A context manager: leaving it stops the agent with SIGTERM."""

    def __init__(self, *flags: str, env: Mapping[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "megascope.agent.cli", "agent", "--no-launch", "--port", "0", *flags],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
            env={**(env if env is not None else os.environ), "PYTHONUNBUFFERED": "1"},
        )  # fmt: skip
        assert self.process.stdout is not None
        line = self.process.stdout.readline()  # the agent's first line, or "" if it exited
        assert line.startswith("megascope agent: listening on "), (line, self.stop())
        self.address = line.rsplit(" ", 1)[-1].strip()
        self.port = int(self.address.rsplit(":", 1)[-1])

    def stop(self) -> str:
        """Stop the agent (SIGTERM) and return what it wrote to stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            _, stderr = self.process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, stderr = self.process.communicate()
        return stderr

    def __enter__(self) -> AgentProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
