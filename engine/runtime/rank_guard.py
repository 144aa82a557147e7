"""The process torch elastic starts for each rank: it runs the real rank as its child and reports how it ended.

``python -m megascope.engine.runtime.rank_guard -m megascope.engine.trainer CONFIG`` (or ``script.py args``).

Only a process's parent learns its exit status, and a rank's parent is torch elastic, which tells nobody
until it gives up. So each rank runs one level down, under this small guard (no torch import, a few MB):

- it starts the rank with the same interpreter, environment and arguments, and PR_SET_PDEATHSIG, so the rank
  never outlives its guard (torch elastic's SIGKILL of a stuck guard takes the rank with it);
- it forwards SIGTERM/SIGINT/SIGHUP to the rank (torch elastic stopping the group);
- it copies the rank's stdout and stderr through, keeping the last lines;
- when the rank ends abnormally, it sends an :class:`ExitReport` (exit code or signal, log tail) to the
  node's agent (``MEGASCOPE_AGENT_ADDRESS``, with the job's secret ``MEGASCOPE_AGENT_SECRET``) at once, then
  exits the same way, so torch elastic sees exactly what the rank did.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from megascope.engine.runtime import parent_death

LOG_TAIL_LINES = 20
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _copy(source: IO[bytes], sink: IO[bytes], tail: collections.deque[str]) -> None:
    for line in iter(source.readline, b""):
        with contextlib.suppress(OSError, ValueError):
            sink.write(line)
            sink.flush()
        tail.append(line.decode(errors="replace").rstrip("\n"))  # deque.append is atomic: no lock


def describe_exit(code: int) -> tuple[int, str]:
    """``(exit_code, signal_name)`` from a Popen return code (negative: killed by that signal)."""
    if code < 0:
        try:
            return 0, signal.Signals(-code).name
        except ValueError:
            return 0, f"signal {-code}"
    return code, ""


def _report(code: int, pid: int, died: float, tail: list[str]) -> None:
    # Imported here, not at the top: a guard whose rank exits cleanly never loads grpc.
    from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV, AGENT_SECRET_ENV, secret_metadata

    address = os.environ.get(AGENT_ADDRESS_ENV)
    if not address:
        return
    import grpc

    from megascope.protos.megascope.v1 import worker_pb2, worker_pb2_grpc

    exit_code, signal_name = describe_exit(code)
    report = worker_pb2.ExitReport(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        pid=pid,
        exit_code=exit_code,
        signal=signal_name,
        wall_time=died,
        log_tail=tail,
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
    )
    # Best effort: the agent may be gone too; the exit status still reaches torch elastic below.
    with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(address) as channel:
        request = worker_pb2.ReportExitRequest(report=report)
        worker_pb2_grpc.WorkerServiceStub(channel).ReportExit(
            request, timeout=2.0, metadata=secret_metadata(os.environ.get(AGENT_SECRET_ENV, ""))
        )


def run(argv: Sequence[str]) -> int:
    child = subprocess.Popen(
        parent_death.command(signal.SIGKILL, [sys.executable, "-u", *argv]),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    for sig in _FORWARDED:
        signal.signal(sig, lambda number, _frame: child.send_signal(number))
    # One tail per stream: the two pipes are read by two threads, so their lines do not interleave in order,
    # and a chatty stdout must not push the traceback out of the report.
    out_tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    err_tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
    assert child.stdout is not None and child.stderr is not None
    copiers = [
        threading.Thread(target=_copy, args=(child.stdout, sys.stdout.buffer, out_tail), daemon=True),
        threading.Thread(target=_copy, args=(child.stderr, sys.stderr.buffer, err_tail), daemon=True),
    ]
    for copier in copiers:
        copier.start()
    code = child.wait()
    died = time.time()
    for copier in copiers:
        copier.join(timeout=1.0)  # the last lines (a traceback) matter most; do not wait forever for them
    if code != 0:
        _report(code, child.pid, died, list(err_tail) or list(out_tail))
    if code < 0:
        # Die of the same signal, so torch elastic reports what really happened to the rank.
        number = -code
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP cannot be handled: already default
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        time.sleep(1.0)
    return code if code >= 0 else 128 - code


def main() -> int:
    argv = sys.argv[1:]
    if not argv:
        print("usage: python -m megascope.engine.runtime.rank_guard (-m MODULE | SCRIPT) [ARGS...]", file=sys.stderr)
        return 2
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
