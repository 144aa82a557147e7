"""Collect the Python stacks of every thread of this node's ranks.

Each rank's trainer registers a faulthandler on SIGUSR1 that appends all threads' stacks to a file it names in
its Hello (see engine/trainer.py). The agent notes each file's size, signals every rank at once, and reads what
was appended once the file stops growing. faulthandler writes from inside the signal handler, in C, so a rank
blocked in a collective answers too. A rank that cannot run its handler (SIGSTOP, stuck in the kernel) does
not answer; where ``py-spy`` is installed and may attach, it reads that rank's stacks from outside instead.

A rank of a script that never calls megascope has no stack file: py-spy reads it (the Python process under it when
the rank runs a shell or a launcher, ``--no-python``). :func:`sample` is the cheap look the supervisor takes at a
quiet rank whose CPU time still advances: has its stack changed (progress), or does it spin in one place?

Only the agent's own descendants are signalled or read (agent/processes.py), checked at the moment of signalling:
a pid from the wire is a claim. What is read back is capped (:data:`MAX_STACK_BYTES` a rank).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from dataclasses import dataclass

import psutil

from megascope.agent.hang_rules import parse_py_spy
from megascope.agent.processes import is_descendant, python_process, signal_descendant

DEFAULT_TIMEOUT_SECONDS = 5.0
MAX_STACK_BYTES = 256 * 1024
"""Of one rank's stacks, at most this much is kept (its newest)."""
MAX_ANSWER_BYTES = 3 << 20
"""All ranks' stacks together: a DumpStacks answer must fit a client's 4 MiB (each rank's share is cut further)."""
NOT_OURS = "not a process of this agent"
_NO_STACK_FILE = "no stack file"
_POLL_SECONDS = 0.05


@dataclass(frozen=True)
class RankTarget:
    rank: int
    pid: int
    stack_file: str


@dataclass(frozen=True)
class RankStackDump:
    rank: int
    pid: int
    text: str | None
    """Every thread's stack, or None when none could be collected."""
    method: str
    """"signal", "py-spy", or why none: "stopped (SIGSTOP)", "exited", "no answer"."""


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_from(path: str, offset: int, most: int = MAX_STACK_BYTES) -> str:
    """What was appended to ``path`` after ``offset``: its last ``most`` bytes, with a marker if more was there."""
    with open(path, "rb") as file:
        end = file.seek(0, os.SEEK_END)
        start = max(offset, end - most)
        file.seek(start)
        text = file.read(most).decode(errors="replace")
    return f"[... {start - offset} bytes trimmed]\n{text}" if start > offset else text


def _process_state(pid: int) -> str | None:
    """None while the process can run its handler; else why not."""
    try:
        status = psutil.Process(pid).status()
    except psutil.NoSuchProcess:
        return "exited"
    except psutil.Error as error:
        return f"unreadable ({error})"
    if status in (psutil.STATUS_STOPPED, psutil.STATUS_TRACING_STOP):
        return "stopped (SIGSTOP)"
    if status == psutil.STATUS_ZOMBIE:
        return "exited"
    return None


async def _py_spy(pid: int, timeout: float, most: int = MAX_STACK_BYTES) -> str | None:
    exe = shutil.which("py-spy")
    if exe is None:
        return None
    pid = python_process(pid)
    # --nonblocking: read the stacks without pausing the process (works on a stopped one, too).
    process = await asyncio.create_subprocess_exec(
        exe, "dump", "--nonblocking", "--pid", str(pid),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(process.communicate(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        return None
    return out[-most:].decode(errors="replace") if process.returncode == 0 and out else None


async def collect(targets: list[RankTarget], timeout: float = DEFAULT_TIMEOUT_SECONDS) -> list[RankStackDump]:
    """Every target's stacks, in ``timeout`` seconds at most."""
    deadline = time.monotonic() + timeout
    most = min(MAX_STACK_BYTES, MAX_ANSWER_BYTES // max(1, len(targets)))
    offsets = {t.rank: _size(t.stack_file) for t in targets}
    pending: dict[int, RankTarget] = {}
    results: dict[int, RankStackDump] = {}
    for target in targets:
        why_not = _process_state(target.pid)
        if why_not is None and target.stack_file:
            if signal_descendant(target.pid, signal.SIGUSR1):  # checked now: the pid may have changed hands
                pending[target.rank] = target
                continue
            why_not = _process_state(target.pid) or NOT_OURS
        results[target.rank] = RankStackDump(target.rank, target.pid, None, why_not or _NO_STACK_FILE)
    sizes = dict(offsets)
    steady: dict[int, int] = {}
    while pending and time.monotonic() < deadline:
        await asyncio.sleep(_POLL_SECONDS)
        for rank, target in list(pending.items()):
            size = _size(target.stack_file)
            # Done once it grew and then did not change for two polls: faulthandler writes one dump in bursts.
            steady[rank] = steady.get(rank, 0) + 1 if size == sizes[rank] and size > offsets[rank] else 0
            sizes[rank] = size
            if steady[rank] >= 2:
                text = await asyncio.to_thread(_read_from, target.stack_file, offsets[rank], most)
                results[rank] = RankStackDump(rank, target.pid, text, "signal")
                del pending[rank]
    for rank, target in pending.items():
        results[rank] = RankStackDump(rank, target.pid, None, _process_state(target.pid) or "no answer")
    for rank, dump in list(results.items()):
        if dump.text is None and dump.method != "exited" and is_descendant(dump.pid):
            spied = await _py_spy(dump.pid, max(1.0, deadline - time.monotonic()), most)
            if spied is not None:
                # A rank without a stack file is read this way by design, not for want of an answer.
                method = "py-spy" if dump.method == _NO_STACK_FILE else f"py-spy, {dump.method}"
                results[rank] = RankStackDump(rank, dump.pid, spied, method)
    return [results[rank] for rank in sorted(results)]


async def sample(pid: int, timeout: float = DEFAULT_TIMEOUT_SECONDS) -> str | None:
    """Where rank process ``pid`` is now: every thread's frames (with lines) from py-spy, as one comparable string;
    None when it cannot be read (no py-spy, not ours, gone)."""
    if not is_descendant(pid):
        return None
    text = await _py_spy(pid, timeout)
    if text is None:
        return None
    threads = parse_py_spy(text)
    return "\n".join(
        f"{thread.ident}: " + " < ".join(f"{f.function}@{f.file}:{f.line}" for f in thread.frames) for thread in threads
    )
