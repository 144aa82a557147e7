"""The agent's own processes: which pids it may trust and signal.

A pid that arrives over the wire (a rank's Hello, an exit report) is a claim, never a fact. The agent signals a
process (SIGUSR1 for stacks, SIGKILL for a hang or a restart) only when, at that moment, the process is one of its
own descendants: torchrun, the rank guards and the ranks are; the agent itself, its parent and anyone else's
process are not. psutil checks the process's creation time before it signals, so a pid reused in between is not
signalled either.
"""

from __future__ import annotations

import os
import signal

import psutil


def is_descendant(pid: int) -> bool:
    """Whether ``pid`` is a live process started (directly or not) by this one; never this process itself."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        return any(parent.pid == os.getpid() for parent in psutil.Process(pid).parents())
    except psutil.Error:
        return False


def is_own_user(pid: int) -> bool:
    """Whether ``pid`` is a live process of this process's user, other than this process (for ranks that an agent
    started with ``--no-launch`` did not launch itself)."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        return psutil.Process(pid).uids().real == os.getuid()
    except psutil.Error:
        return False


def launched_rank(pid: int) -> tuple[int, int] | None:
    """``(RANK, WORLD_SIZE)`` from the environment torch elastic gave process ``pid``; None when unreadable or absent
    (a process not started by torch elastic)."""
    try:
        environment = psutil.Process(pid).environ()
        return int(environment["RANK"]), int(environment["WORLD_SIZE"])
    except (psutil.Error, KeyError, ValueError):
        return None


def signal_descendant(pid: int, sig: signal.Signals) -> bool:
    """Send ``sig`` to ``pid`` if it is this process's descendant now; whether it was sent."""
    if pid <= 0 or pid == os.getpid():
        return False
    try:
        process = psutil.Process(pid)
        if not any(parent.pid == os.getpid() for parent in process.parents()):
            return False
        process.send_signal(sig)  # checks that the pid still names the same process
    except psutil.Error:
        return False
    return True


def python_process(pid: int) -> int:
    """The Python process that runs a rank whose process is ``pid``: ``pid`` itself when it is Python, else the first
    Python process among its descendants (a rank launched with ``--no-python``: ``bash wrapper.sh``, ``accelerate
    launch``); ``pid`` when there is none (py-spy then says why)."""
    try:
        process = psutil.Process(pid)
        if _is_python(process):
            return pid
        for child in process.children(recursive=True):
            if _is_python(child):
                return child.pid
    except psutil.Error:
        pass
    return pid


def _is_python(process: psutil.Process) -> bool:
    try:
        return os.path.basename(process.exe()).startswith("python")
    except psutil.Error:
        return False


def kill_tree(pid: int) -> int:
    """SIGKILL ``pid`` and its descendants, each only if it is this process's descendant now; how many were signalled.

    The descendants first: with the rank's process gone first, a rank started by a shell (``--no-python``) would be
    re-parented out of reach."""
    try:
        children = psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        children = []
    killed = sum(signal_descendant(child.pid, signal.SIGKILL) for child in reversed(children))
    return killed + signal_descendant(pid, signal.SIGKILL)


def worker_of(pid: int, launcher: int) -> int | None:
    """The process ``launcher`` (torchrun) started that ``pid`` runs under: the rank's guard, which torch elastic
    watches. None when ``pid`` is not below ``launcher``."""
    try:
        lineage = [psutil.Process(pid), *psutil.Process(pid).parents()]
    except psutil.Error:
        return None
    for process, parent in zip(lineage, lineage[1:], strict=False):
        if parent.pid == launcher:
            return process.pid
    return None
