"""Tie a child process's life to its parent's (Linux ``PR_SET_PDEATHSIG``), without ``preexec_fn``.

``python -m megascope.engine.runtime.parent_death SIGNAL PARENT_PID PROGRAM [ARGS...]`` asks the kernel to send SIGNAL
to this process when its parent dies, checks that the parent is still PARENT_PID (it may have died already),
then executes PROGRAM in its place: the setting survives ``exec``.

Why a separate step rather than ``subprocess.Popen(preexec_fn=...)``: ``preexec_fn`` makes Popen fork the
whole parent and run Python in the child before ``exec``; the agent has gRPC threads running, and forking
those aborts now and then (gRPC's epoll state in the child). Without ``preexec_fn`` Popen spawns safely.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Sequence

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int) -> None:
    """Ask for ``sig`` when the parent dies (best effort: Linux only)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


def command(sig: signal.Signals, program: Sequence[str]) -> list[str]:
    """``program`` (an argv) wrapped so that it receives ``sig`` when the calling process dies."""
    return [sys.executable, "-m", "megascope.engine.runtime.parent_death", sig.name, str(os.getpid()), *program]


def main() -> int:
    if len(sys.argv) < 4:
        usage = "usage: python -m megascope.engine.runtime.parent_death SIGNAL PARENT_PID PROGRAM [ARGS...]"
        print(usage, file=sys.stderr)
        return 2
    sig, parent, program = signal.Signals[sys.argv[1]], int(sys.argv[2]), sys.argv[3:]
    die_with_parent(sig)
    if os.getppid() != parent:
        return 128 + sig  # the parent died before the request took hold: act as if the signal came
    os.execvp(program[0], program)


if __name__ == "__main__":
    sys.exit(main())
