"""The process torch elastic starts for each rank: it runs the real rank as its child, watches it, and reports how
it ended.

``python -m megascope.engine.runtime.rank_guard -m megascope.engine.trainer CONFIG`` (or ``script.py args``, or
``--no-python COMMAND args`` for a command that is not a Python script: ``bash wrapper.sh``, ``accelerate launch``).

Only a process's parent learns its exit status, and a rank's parent is torch elastic, which tells nobody
until it gives up. So each rank runs one level down, under this small guard (no torch import, a few MB):

- it starts the rank with the same interpreter, environment and arguments (or the command as given, with
  ``--no-python``), and PR_SET_PDEATHSIG, so the rank never outlives its guard (torch elastic's SIGKILL of a stuck
  guard takes the rank with it);
- it forwards SIGTERM/SIGINT/SIGHUP to the rank (torch elastic stopping the group);
- it copies the rank's stdout and stderr through, keeping the last lines and counting them;
- under an agent (``MEGASCOPE_AGENT_ADDRESS``, with the job's secret ``MEGASCOPE_AGENT_SECRET``) it attaches as the
  rank's guard (``Hello.role`` GUARD, the rank's pid) and sends, about once a second, how many lines the rank wrote,
  the lines themselves (the dashboard's ``l``) and the CPU seconds of its process tree: what lets the agent
  supervise a script that never calls megascope (alive, progressing, hung). It never parses the output: steps come
  only from the rank itself. The copy threads only append each line to a bounded deque; the lines leave from the
  link's own thread, so a slow or absent agent costs the rank nothing (past :data:`LINES_PER_PROGRESS` lines a
  second the oldest are dropped, and counted);
- when the rank exits with status 0 it says ``finished`` on that stream (a script without the API finishes
  cleanly, not as a crash); when it ends abnormally it sends an :class:`ExitReport` (exit code or signal, log tail)
  at once, then exits the same way, so torch elastic sees exactly what the rank did; whatever gRPC does, the guard
  outlives its rank by at most :data:`ENDING_SECONDS`.

The agent is optional: without one, or while it is unreachable, the rank runs exactly as it would alone. Everything
the guard does for the agent happens on a background thread, after the rank has started.

With recovery in place (``MEGASCOPE_RECOVERY_STORE`` set: engine/runtime/recovery_env.py) and our trainer as the
rank (:func:`uses_warm_parent`), the rank is forked by a warm parent (engine/runtime/warm_parent.py) that imported it
once, and an abnormal end is not the guard's: after its exit report, the guard asks for a replacement (same RANK,
``MEGASCOPE_REPLACEMENT`` counting) and attaches to the agent again as the new process's guard, so torch elastic,
which restarts every rank when one worker exits, sees nothing. :func:`should_replace` says when not (a repeated
fault, a rank that could not recover, a stop asked for): then the guard exits as above, and the job restarts.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import IO, TYPE_CHECKING, NoReturn

import psutil

from megascope.engine.runtime import parent_death, recovery_env, warm_parent
from megascope.protos.megascope.v1 import telemetry_pb2, worker_pb2

if TYPE_CHECKING:
    from megascope.engine.runtime.agent_link import AgentSink

LOG_TAIL_LINES = 20
LINES_PER_PROGRESS = 256
"""Lines one progress message carries at most (the agent refuses more); 256 lines of 1 KiB stay well under the
worker channel's 1 MiB message limit."""
LINE_BYTES = 1024
"""A line longer than this (UTF-8) reaches the agent cut to it, marked."""
NO_PYTHON_FLAG = "--no-python"
"""First argument: run the command as given (torchrun's ``--no-python``), not as a Python script."""
PROGRESS_SECONDS = 1.0
"""How often the guard tells the agent what its rank did."""
CONNECT_WAIT_SECONDS = 2.0
"""At a clean exit, how long to wait for the stream to the agent (still connecting) to say ``finished`` on it."""
ENDING_SECONDS = 60.0
"""Once its rank has ended for good, how long the guard may take to tell the agent before it exits regardless: see
:func:`_bound_the_ending`."""
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


_Pending = tuple[int, int, str]
"""A line waiting for the agent: (its stream, its number in that stream from 1, its text)."""


class _Stream:
    """One of the rank's output streams: its last lines and how many it wrote (one writer: its copier thread).

    ``outbox`` is shared by both streams and bounded: the copier appends, the link's thread takes from the left.
    ``deque.append`` and ``popleft`` are atomic, so neither side ever waits for the other; when the link falls
    behind, the bound drops the oldest lines, and their numbers tell the link how many it missed."""

    def __init__(self, kind: int, outbox: collections.deque[_Pending] | None = None) -> None:
        self.kind = kind
        self.tail: collections.deque[str] = collections.deque(maxlen=LOG_TAIL_LINES)
        self.outbox = outbox
        self.lines = 0
        self.marks = threading.Semaphore(0)
        """Released at each :data:`warm_parent.EXITED_MARK` read: the lines of a rank that exited are all in."""


def _copy(source: IO[bytes], sink: IO[bytes], stream: _Stream) -> None:
    for line in iter(source.readline, b""):
        if line.endswith(warm_parent.EXITED_MARK):
            stream.marks.release()
            line = line[: -len(warm_parent.EXITED_MARK)]  # the dead rank's last line, if it had no newline
            if not line:
                continue
        with contextlib.suppress(OSError, ValueError):
            sink.write(line)
            sink.flush()
        text = line.decode(errors="replace").rstrip("\n")
        stream.tail.append(text)  # deque.append is atomic: no lock
        stream.lines += 1
        if stream.outbox is not None:
            stream.outbox.append((stream.kind, stream.lines, text))


def cut_line(text: str, most: int = LINE_BYTES) -> str:
    """``text`` in at most ``most`` UTF-8 bytes; a cut one ends with ``[cut: N bytes]`` (N: the line's length)."""
    data = text.encode()
    if len(data) <= most:
        return text
    marker = f" [cut: {len(data)} bytes]"
    return data[: max(0, most - len(marker.encode()))].decode(errors="ignore") + marker


class _Lines:
    """Takes the lines waiting in the outbox for one progress message: at most :data:`LINES_PER_PROGRESS`, and how
    many were lost since the last (dropped by the outbox's bound, or left for being too many). Used by one thread
    at a time: the link's, then, once it has stopped, the guard's last message."""

    def __init__(self, outbox: collections.deque[_Pending]) -> None:
        self._outbox = outbox
        self._seen: dict[int, int] = {}
        """The number of the last line taken of each stream: a jump past it is lines lost."""

    def take(self) -> tuple[list[telemetry_pb2.LogLine], int]:
        taken: list[_Pending] = []
        with contextlib.suppress(IndexError):  # empty: popleft is atomic, so no check-then-act race
            while True:
                taken.append(self._outbox.popleft())
        lost = 0
        for kind, number, _text in taken:
            lost += number - self._seen.get(kind, 0) - 1
            self._seen[kind] = number
        if len(taken) > LINES_PER_PROGRESS:
            lost += len(taken) - LINES_PER_PROGRESS
            taken = taken[-LINES_PER_PROGRESS:]
        lines = [telemetry_pb2.LogLine(text=cut_line(text), stream=kind) for kind, _number, text in taken]  # type: ignore[arg-type]
        return lines, lost


def describe_exit(code: int) -> tuple[int, str]:
    """``(exit_code, signal_name)`` from a Popen return code (negative: killed by that signal)."""
    if code < 0:
        try:
            return 0, signal.Signals(-code).name
        except ValueError:
            return 0, f"signal {-code}"
    return code, ""


def _report(code: int, pid: int, died: float, tail: list[str], cause: str = "") -> None:
    # Imported here, not at the top: a guard whose rank exits cleanly never loads grpc.
    from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV, AGENT_SECRET_ENV, secret_metadata

    address = os.environ.get(AGENT_ADDRESS_ENV)
    if not address:
        return
    import grpc

    from megascope.protos.megascope.v1 import worker_pb2_grpc

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
        cause=cause,
    )
    # Best effort: the agent may be gone too; the exit status still reaches torch elastic below.
    with contextlib.suppress(grpc.RpcError), grpc.insecure_channel(address) as channel:
        request = worker_pb2.ReportExitRequest(report=report)
        worker_pb2_grpc.WorkerServiceStub(channel).ReportExit(
            request, timeout=2.0, metadata=secret_metadata(os.environ.get(AGENT_SECRET_ENV, ""))
        )


def _cpu_seconds(process: psutil.Process) -> float:
    """CPU seconds of ``process`` and its descendants (live ones, and the ones it waited for)."""
    try:
        times = process.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        children = process.children(recursive=True)
    except psutil.Error:
        return 0.0
    for child in children:
        with contextlib.suppress(psutil.Error):
            times = child.cpu_times()
            total += times.user + times.system
    return total


class _Watch:
    """The guard's link to the agent: attach as the rank's guard, then send its progress once a second.

    Runs on its own thread and swallows every error: the rank must never be slowed down or fail because of it."""

    def __init__(self, pid: int, streams: Sequence[_Stream], lines: _Lines) -> None:
        self._pid = pid
        self._streams = streams
        self._lines = lines
        self._done = threading.Event()
        self._sink: AgentSink | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="megascope-rank-guard", daemon=True)
        self._thread.start()

    def _progress(self, process: psutil.Process | None) -> worker_pb2.ProcessProgress:
        lines, lost = self._lines.take()
        return worker_pb2.ProcessProgress(
            output_lines=sum(stream.lines for stream in self._streams),
            cpu_seconds=_cpu_seconds(process) if process is not None else 0.0,
            wall_time=time.time(),
            restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
            lines=lines,
            lines_dropped=lost,
        )

    def _run(self) -> None:
        try:
            self._sink = _attach(self._pid)
        except Exception:  # noqa: BLE001 (no agent, or a broken one: the rank runs on unobserved)
            self._sink = None
        finally:
            self._ready.set()
        if self._sink is None:
            return
        try:
            process = psutil.Process(self._pid)
            while not self._done.wait(PROGRESS_SECONDS):
                if self._sink.connected:  # until then the lines wait in the outbox (a message now would be dropped)
                    self._sink.write_progress(self._progress(process))
        except Exception:  # noqa: BLE001, S110 (the rank matters, not its telemetry)
            pass

    def finish(self, code: int) -> None:
        """The rank ended with ``code``: a last progress (its last lines: a traceback, a summary), ``finished`` for a
        clean exit; then the stream ends."""
        self._done.set()
        self._ready.wait(CONNECT_WAIT_SECONDS)
        sink = self._sink
        if sink is None:
            return
        # The link's thread may be sending a progress: one taker of the lines at a time keeps them in order.
        self._thread.join(timeout=CONNECT_WAIT_SECONDS)
        try:
            # A clean exit waits for the stream to say ``finished``; an abnormal one never waits (torch elastic should
            # learn of it at once, and ReportExit already carried its last lines), so its lines go only if connected.
            deadline = time.monotonic() + CONNECT_WAIT_SECONDS
            while code == 0 and not sink.connected and time.monotonic() < deadline:
                time.sleep(0.02)
            if not self._thread.is_alive():
                # CPU time is not measured: the process is gone (its counter only moves forward at the agent).
                sink.write_progress(self._progress(None))
            if code == 0:
                sink.write_signal(worker_pb2.RankFinished())
            sink.close(timeout=CONNECT_WAIT_SECONDS)
        except Exception:  # noqa: BLE001, S110
            pass


def _attach(pid: int) -> AgentSink | None:
    """A stream to the agent as the guard of rank ``$RANK``, whose process is ``pid``; None without an agent."""
    from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV, AGENT_SECRET_ENV, AgentSink

    address = os.environ.get(AGENT_ADDRESS_ENV)
    if not address:
        return None
    rank = int(os.environ.get("RANK", 0))
    hello = worker_pb2.Hello(
        rank=rank,
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", rank + 1)),
        pid=pid,
        node=os.environ.get("MEGASCOPE_NODE", ""),
        restart_count=int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)),
        run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""),
        role=worker_pb2.WORKER_ROLE_GUARD,
    )
    return AgentSink(address, hello, capacity=16, secret=os.environ.get(AGENT_SECRET_ENV, ""))


def child_command(argv: Sequence[str]) -> list[str]:
    """The rank's command: ``argv`` as a Python script or module (``-u``: its lines reach us as written), or as given
    after :data:`NO_PYTHON_FLAG`."""
    if argv[:1] == [NO_PYTHON_FLAG]:
        return list(argv[1:])
    return [sys.executable, "-u", *argv]


def _copy_output(process: subprocess.Popen[bytes]) -> tuple[_Stream, _Stream, _Lines, list[threading.Thread]]:
    """Start copying ``process``'s stdout and stderr through: the two streams, their lines for the agent, the
    threads."""
    # One tail per stream: the two pipes are read by two threads, so their lines do not interleave in order,
    # and a chatty stdout must not push the traceback out of the report.
    outbox: collections.deque[_Pending] = collections.deque(maxlen=LINES_PER_PROGRESS)
    out = _Stream(telemetry_pb2.LOG_STREAM_STDOUT, outbox)
    err = _Stream(telemetry_pb2.LOG_STREAM_STDERR, outbox)
    assert process.stdout is not None and process.stderr is not None
    copiers = [
        threading.Thread(target=_copy, args=(process.stdout, sys.stdout.buffer, out), daemon=True),
        threading.Thread(target=_copy, args=(process.stderr, sys.stderr.buffer, err), daemon=True),
    ]
    for copier in copiers:
        copier.start()
    return out, err, _Lines(outbox), copiers


def _join(copiers: Sequence[threading.Thread]) -> None:
    for copier in copiers:
        copier.join(timeout=1.0)  # the last lines (a traceback) matter most; do not wait forever for them


def _tail(out: _Stream, err: _Stream) -> list[str]:
    """The lines of an exit report: stderr's, where tracebacks go, unless the rank wrote none there."""
    return list(err.tail) or list(out.tail)


def _bound_the_ending() -> None:
    """The rank has ended (for good, or until the caller cancels this to replace it): from now on the guard only
    tells the agent (bounded waits, a few seconds) and exits. Should gRPC still block it (closing a channel can
    deadlock against the GIL: grpc#42247, grpc#43421), a guard that never exits would hide its rank's end from torch
    elastic forever, and the job would hang. So a watchdog in C (faulthandler's, which needs no GIL) writes every
    thread's stack to stderr after :data:`ENDING_SECONDS` and ends the process with exit code 1."""
    faulthandler.dump_traceback_later(ENDING_SECONDS, exit=True, file=sys.stderr)


def _exit_as(code: int) -> int:
    """End this guard as its rank ended (``code``, Popen's), so torch elastic sees exactly what the rank did."""
    if code < 0:
        # Die of the same signal, so torch elastic reports what really happened to the rank.
        number = -code
        with contextlib.suppress(OSError, ValueError):  # SIGKILL and SIGSTOP cannot be handled: already default
            signal.signal(number, signal.SIG_DFL)
        os.kill(os.getpid(), number)
        time.sleep(1.0)
    return code if code >= 0 else 128 - code


def run(argv: Sequence[str]) -> int:
    if uses_warm_parent(argv):
        return run_warm(argv)
    child = subprocess.Popen(
        parent_death.command(signal.SIGKILL, child_command(argv)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    for sig in _FORWARDED:
        signal.signal(sig, lambda number, _frame: child.send_signal(number))
    out, err, lines, copiers = _copy_output(child)
    watch = _Watch(child.pid, (out, err), lines)
    code = child.wait()
    died = time.time()
    _bound_the_ending()
    _join(copiers)
    if code != 0:
        # Before the stream ends: the agent learns how the rank died before it sees its guard go.
        _report(code, child.pid, died, _tail(out, err))
    watch.finish(code)
    return _exit_as(code)


TRAINER_MODULE = "megascope.engine.trainer"
WARM_MODULES_ENV = "MEGASCOPE_WARM_MODULES"
"""Modules (comma-separated) that run under a warm parent too, beside our trainer, when recovery is in place: for
tests, which replace a tiny module's ranks (any module with ``main(argv)``) without training anything."""
REPEAT_FAULT_SECONDS = 60.0
"""A replacement that ends abnormally within this long of its start is a repeated fault on the same rank: it is not
replaced again; the guard exits, and torch elastic restarts the whole job from its newest checkpoint. A rank that
fails at once, over and over (a bad node, a bug the state brings back) must not be replaced forever. The default
of :data:`REPEAT_FAULT_SECONDS_ENV`."""
REPEAT_FAULT_SECONDS_ENV = "MEGASCOPE_REPEAT_FAULT_SECONDS"
"""Overrides :data:`REPEAT_FAULT_SECONDS` (seconds, >= 0; 0: a replacement is always replaced again). For tests that
kill ranks faster than a real fault would (the soak test's hundred faults in minutes); read at each fault."""


def repeat_fault_seconds(environ: Mapping[str, str] | None = None) -> float:
    """The repeated-fault window: :data:`REPEAT_FAULT_SECONDS_ENV` if it holds a number >= 0, else (unset, or a
    value that is not one, with a warning naming it) :data:`REPEAT_FAULT_SECONDS`. A bad value must not end the
    guard, and with it the rank it watches."""
    environ = os.environ if environ is None else environ
    text = environ.get(REPEAT_FAULT_SECONDS_ENV, "").strip()
    if not text:
        return REPEAT_FAULT_SECONDS
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds < float("inf"):  # also NaN
        print(
            f"megascope rank guard: {REPEAT_FAULT_SECONDS_ENV}={text!r} is not a number of seconds >= 0; "
            f"using the default, {REPEAT_FAULT_SECONDS:g}",
            file=sys.stderr,
            flush=True,
        )
        return REPEAT_FAULT_SECONDS
    return seconds


def uses_warm_parent(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> bool:
    """Whether the rank ``argv`` runs under a warm parent: recovery is in place (the recovery store is named) and
    the rank is our trainer (``-m megascope.engine.trainer``; or a module of :data:`WARM_MODULES_ENV`). Anything
    else (a user's script) runs as a plain child, and a fault restarts the job."""
    environ = os.environ if environ is None else environ
    if recovery_env.store_address(environ) is None or len(argv) < 2 or argv[0] != "-m":
        return False
    extra = {name.strip() for name in environ.get(WARM_MODULES_ENV, "").split(",")} - {""}
    return argv[1] == TRAINER_MODULE or argv[1] in extra


def should_replace(code: int, replacements: int, lived_seconds: float, stopping: bool) -> bool:
    """Whether a rank that ended with ``code`` (Popen's) is replaced in place: not a clean exit, not one the guard
    was asked for (``stopping``: torch elastic stopping the group), not a rank that could not recover in place
    (:data:`~recovery_env.RECOVERY_FAILED_EXIT`), and not a replacement (``replacements`` so far) that failed
    within :func:`repeat_fault_seconds` of its start (``lived_seconds``). A survivor that left because it never saw
    its collective fail (:data:`~recovery_env.STUCK_SURVIVOR_EXIT`) is always replaced: that is gloo's fault, not a
    fault of the rank that repeats."""
    if code == 0 or stopping or code == recovery_env.RECOVERY_FAILED_EXIT:
        return False
    if code == recovery_env.STUCK_SURVIVOR_EXIT:
        return True
    return replacements == 0 or lived_seconds >= repeat_fault_seconds()


def _describe(code: int) -> str:
    exit_code, signal_name = describe_exit(code)
    return signal_name or f"exit code {exit_code}"


def run_warm(argv: Sequence[str]) -> int:
    """:func:`run` for a rank that can be replaced in place (:func:`uses_warm_parent`): the rank is forked by a warm
    parent (engine/runtime/warm_parent.py), and when it ends abnormally the guard reports it as always, then, if
    :func:`should_replace` allows, asks for a replacement (same RANK, ``MEGASCOPE_REPLACEMENT`` set) and attaches to
    the agent again as the guard of the new process, instead of exiting: torch elastic sees nothing. Otherwise it
    exits as :func:`run` does."""
    link = warm_parent.WarmParentLink(argv)
    stopping: list[int] = []

    def forward(number: int, _frame: object) -> None:
        stopping.append(number)
        with contextlib.suppress(ProcessLookupError):
            link.process.send_signal(number)  # the warm parent forwards it to its live rank

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    out, err, lines, copiers = _copy_output(link.process)
    message = link.read()
    if message is None:
        # The warm parent ended before its first rank (the module failed to import or preload): it was the rank.
        code = link.process.wait()
        _bound_the_ending()
        _join(copiers)
        if code != 0:
            _report(code, link.process.pid, time.time(), _tail(out, err))
        return _exit_as(code)
    code, replacements = 0, 0
    endings: list[threading.Thread] = []
    rank = os.environ.get("RANK", "0")
    while message is not None:
        _, pid, _ = message  # started
        if stopping:
            forward(stopping[-1], None)  # the signal came while no rank was live, before this one started
        watch = _Watch(pid, (out, err), lines)
        started = time.monotonic()
        message = link.read()
        died = time.time()
        if message is None:
            # The warm parent was killed, and its rank with it (PR_SET_PDEATHSIG): the rank ended as it did.
            code = link.process.wait()
            _join(copiers)
        else:
            code = message[2]
            for stream in (out, err):
                stream.marks.acquire(timeout=1.0)  # until the rank's last lines are copied (its traceback)
        _bound_the_ending()  # the report below may be the guard's last act, and must not hang it
        if code != 0:
            # Here (our trainer, recovering in place) exit codes 75 and 76 are ours, and say why the rank left.
            _report(code, pid, died, _tail(out, err), recovery_env.exit_cause(code))
        if message is None or not should_replace(code, replacements, time.monotonic() - started, bool(stopping)):
            watch.finish(code)
            break
        faulthandler.cancel_dump_traceback_later()  # not the end: a replacement follows
        replacements += 1
        print(
            f"megascope rank guard: rank {rank} (pid {pid}) ended ({_describe(code)}): replacing it in place "
            f"(replacement {replacements})",
            file=sys.stderr,
            flush=True,
        )
        for stream in (out, err):
            stream.tail.clear()  # the next report is about the replacement's own lines
        forked = link.fork(replacements)
        # The dead rank's stream ends off the replacement's path: closing it waits on its link's thread (a second).
        ending = threading.Thread(target=watch.finish, args=(code,), name="megascope-rank-guard-end", daemon=True)
        ending.start()
        endings.append(ending)
        message = link.read() if forked else None
    link.quit()
    for ending in endings:
        ending.join(timeout=2 * CONNECT_WAIT_SECONDS)
    _join(copiers)
    return _exit_as(code)


def main() -> int:
    argv = sys.argv[1:]
    if not argv:
        print(
            "usage: python -m megascope.engine.runtime.rank_guard (-m MODULE | SCRIPT | --no-python COMMAND) [ARGS...]",
            file=sys.stderr,
        )
        return 2
    if argv == [NO_PYTHON_FLAG]:
        print(f"rank_guard: {NO_PYTHON_FLAG} needs a command to run", file=sys.stderr)
        return 2
    return run(argv)


def _leave(code: int) -> NoReturn:
    """Exit with ``code`` at once: the interpreter's own shutdown (atexit handlers, gRPC's static destructors, with
    its threads and a stream to the agent perhaps still open) is not needed by a guard and has hung at exit before."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    _leave(main())
