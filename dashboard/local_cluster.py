"""A cluster of agents on this machine, started as child processes: what ``megascope demo`` runs on.

The agents share a token generated here (:attr:`LocalCluster.transport` carries it for the demo's own client): it
reaches them in ``$MEGASCOPE_TOKEN``, not on their command line, where every user of the host could read it.

Each agent is ``megascope agent --port 0 ...`` in its own session (so a Ctrl-C in the terminal reaches the
demo, which then stops them in order, rather than killing them mid-write). Its first stdout line gives its
address; the rest of its output goes to ``<run_dir>/agent-<node>.log``. On exit every agent gets SIGTERM
(it stops its ranks gracefully); whatever of the process tree is still alive after the grace is killed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import psutil

from megascope.dashboard.transport import TOKEN_ENV, Transport
from megascope.engine.runtime import run_dir as paths

_STARTUP_SECONDS = 60.0
_STOP_GRACE_SECONDS = 20.0
_LISTENING = "megascope agent: listening on "


class LocalClusterError(RuntimeError):
    """An agent could not start; the message says which and where its log is."""

    def __init__(self, message: str, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage
        """The agent refused its flags (exit 2): the message is its own error, naming the flag."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalCluster:
    def __init__(
        self,
        nodes: int,
        ranks_per_node: int,
        train_args: list[str],
        run_dir: str | None = None,
        exit_when_done: bool = False,
        min_nodes: int | None = None,
    ) -> None:
        self.nodes = nodes
        self.min_nodes = min_nodes
        self.ranks_per_node = ranks_per_node
        self.train_args = train_args
        self.run_dir = Path(run_dir or time.strftime("runs/demo-%Y%m%d-%H%M%S"))
        self.exit_when_done = exit_when_done
        self.agents: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []
        self._known: dict[int, psutil.Process] = {}
        """Every process of the tree seen so far, by pid, so that none outlives the demo."""
        self._previous_handlers: dict[signal.Signals, Any] = {}
        self.transport = Transport(token=secrets.token_urlsafe(32))
        """How the demo's client reaches these agents: plaintext on 127.0.0.1, with the agents' generated token."""

    def __enter__(self) -> LocalCluster:
        # SIGTERM and SIGHUP (the terminal went away) become KeyboardInterrupt, so one path (unwinding
        # through __exit__) cleans up after all three: the agents run in their own sessions and would
        # otherwise outlive the demo.
        self._previous_handlers = {sig: signal.signal(sig, _raise_interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        try:
            self.stop()
        finally:
            for sig, handler in self._previous_handlers.items():
                signal.signal(sig, handler)

    @property
    def token_file(self) -> Path:
        """The agents' token, for another client of the demo's agents (``megascope dashboard --token-file``)."""
        return self.run_dir / "agent-token"

    def start(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.token_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as out:
            out.write(f"{self.transport.token}\n")
        rendezvous = f"127.0.0.1:{free_port()}"
        run_id = f"demo-{uuid.uuid4().hex[:8]}"
        nnodes = f"{self.min_nodes}:{self.nodes}" if self.min_nodes else str(self.nodes)
        # Every agent saves into one directory (one host): what a restart resumes from, and what merges read.
        checkpoints = ["--ckpt-dir", str(paths.checkpoints_dir(self.run_dir)), "--ckpt-keep", "10"]
        for index in range(self.nodes):
            node = f"node{index}"
            command = [
                # --no-config: the demo's agents are the demo's (plaintext on loopback), whatever the user's profile.
                sys.executable, "-m", "megascope.agent.cli", "agent", "--no-config", "--port", "0", "--node", node,
                "--nproc-per-node", str(self.ranks_per_node), "--nnodes", nnodes,
                "--rdzv-endpoint", rendezvous, "--rdzv-id", run_id, "--run-dir", str(self.run_dir),
                *checkpoints, *self.train_args, *(["--exit-when-done"] if self.exit_when_done else []),
            ]  # fmt: skip
            log = open(paths.agent_log(self.run_dir, node), "w")  # noqa: SIM115 (handed to the child)
            process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=log, text=True, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1", **{TOKEN_ENV: self.transport.token or ""}),
            )  # fmt: skip
            log.close()
            self.agents.append(process)
            self._remember_tree()
            self.addresses.append(self._read_address(process, node))
            threading.Thread(
                target=_copy_rest, args=(process, paths.agent_output(self.run_dir, node)), daemon=True
            ).start()

    def _read_address(self, process: subprocess.Popen[str], node: str) -> str:
        assert process.stdout is not None
        deadline = time.monotonic() + _STARTUP_SECONDS
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break  # it exited
            if line.startswith(_LISTENING):
                return line[len(_LISTENING) :].strip()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)
        refusal = _flag_error(paths.agent_log(self.run_dir, node)) if process.poll() == 2 else None
        if refusal is not None:
            # The demo passes its training flags (--inject ...) through: say what the agent said about them.
            raise LocalClusterError(refusal, usage=True)
        raise LocalClusterError(
            f"agent for {node} did not start (exit code {process.poll()}); see {paths.agent_log(self.run_dir, node)}"
        )

    def _remember_tree(self) -> None:
        for agent in self.agents:
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(agent.pid)
                self._known.setdefault(root.pid, root)
                for child in root.children(recursive=True):
                    self._known.setdefault(child.pid, child)

    def remember_processes(self) -> None:
        """Record the agents' current descendants (torchrun and ranks); call now and then while running."""
        self._remember_tree()

    def wait(self, timeout: float | None = None) -> list[int | None]:
        """Exit codes of the agents once they all exit (None for any still running at the timeout)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for agent in self.agents:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                agent.wait(remaining)
        return [agent.poll() for agent in self.agents]

    def stop(self) -> None:
        """SIGTERM each agent (they stop their ranks), then kill whatever of the tree is still alive."""
        self._remember_tree()
        for agent in self.agents:
            if agent.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    agent.send_signal(signal.SIGTERM)
        self.wait(_STOP_GRACE_SECONDS)
        leftovers = [p for p in self._known.values() if _alive(p)]
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(leftovers, timeout=5)
        for agent in self.agents:
            if agent.poll() is None:
                agent.kill()
                agent.wait()

    def pids(self) -> list[int]:
        """Every pid of the tree seen so far (for tests that check nothing is left behind)."""
        self._remember_tree()
        return sorted(self._known)


def _flag_error(log: Path) -> str | None:
    """The ``megascope agent: error: ...`` line of an agent that refused its flags, without that prefix."""
    prefix = "megascope agent: error: "
    with contextlib.suppress(OSError):
        for line in reversed(log.read_text().splitlines()):
            if line.startswith(prefix):
                return line[len(prefix) :]
    return None


def _alive(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _copy_rest(process: subprocess.Popen[str], path: Path) -> None:
    assert process.stdout is not None
    with open(path, "w") as out:
        for line in process.stdout:
            out.write(line)
            out.flush()


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt
