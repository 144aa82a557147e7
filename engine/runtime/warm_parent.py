"""The warm parent: imports a rank's module once, then forks the rank, and forks a replacement when it dies.

``python -u -m megascope.engine.runtime.warm_parent --pipe=IN,OUT -m MODULE [ARGS...]``, started by the rank guard
(engine/runtime/rank_guard.py) when recovery is in place (engine/runtime/recovery_env.py). A fresh rank spends
seconds importing torch and the trainer; a rank forked from a process that already did is running in milliseconds,
which is what lets a failed rank be replaced while the others wait (issue 18).

- It imports ``MODULE`` and calls ``MODULE.preload(ARGS)`` if there is one (the work every rank would repeat), then
  forks the first rank at once. The rank (the forked child) asks for SIGKILL when the warm parent dies
  (PR_SET_PDEATHSIG), gets Python's default signal handlers back, runs ``MODULE.main(ARGS)`` and exits with what it
  returned (an exception: its traceback on stderr, exit code 1), as ``python -m MODULE ARGS`` would.
- It talks to its guard over a pipe pair, one line a message. To the guard (``OUT``): ``started PID``, then
  ``exited PID CODE`` (CODE as Popen's returncode: the exit code, or minus the signal that killed the rank). From
  the guard (``IN``): ``fork N`` (a replacement, the rank's Nth: it runs with :data:`REPLACEMENT_ENV` = N) or
  ``quit``. Before ``exited`` it writes :data:`EXITED_MARK` on its stdout and stderr (the rank's, shared): every
  line before the mark is the dead rank's, so its guard can report its last lines.
- SIGTERM, SIGINT and SIGHUP are forwarded to the live rank (torch elastic stopping the group). It exits when told
  ``quit``, or when its guard goes (``IN`` at its end; the guard also starts it with PR_SET_PDEATHSIG).

It stays single-threaded: a fork copies only the thread that calls it, so a lock held by any other thread (gRPC's,
OpenMP's, the allocator's) would stay locked in the rank forever. ``preload`` must start no thread; should one run
all the same at the fork, the rank is started as a fresh process instead (correct, only slower), with a warning
naming them.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import select
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import IO, NoReturn

from megascope.engine.runtime import parent_death
from megascope.engine.runtime.recovery_env import REPLACEMENT_ENV

MODULE = "megascope.engine.runtime.warm_parent"
PIPE_FLAG = "--pipe"
RUN_FLAG = "--run"
"""Instead of ``--pipe``: run the module's rank once in this process (a rank that could not be forked)."""
EXITED_MARK = b"\0megascope-warm-parent: the rank exited\n"
"""Written on the rank's stdout and stderr after it exited, before ``exited``: the guard's copy drops it."""
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_USAGE = f"usage: python -m {MODULE} {PIPE_FLAG}=IN_FD,OUT_FD -m MODULE [ARGS...]"


def threads_running() -> list[str]:
    """The names of this process's threads (``/proc/self/task``): one, the main thread, when it is safe to fork."""
    names = []
    for task in sorted(os.listdir("/proc/self/task")):
        with contextlib.suppress(OSError), open(f"/proc/self/task/{task}/comm") as comm:
            names.append(f"{comm.read().strip()} ({task})")
    return names


def _exit_code(result: object) -> int:
    """What ``sys.exit(result)`` would exit with (None: 0; an int: itself; anything else printed, 1)."""
    if result is None:
        return 0
    if isinstance(result, int):
        return result
    print(result, file=sys.stderr)
    return 1


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _run_main(module: ModuleType, args: list[str]) -> int:
    """``module.main(args)`` as ``python -m module`` would end: its exit code, a traceback for an exception."""
    try:
        code = _exit_code(module.main(args))
    except SystemExit as stop:
        code = _exit_code(stop.code)
    except KeyboardInterrupt:
        # As the interpreter does for an uncaught Ctrl-C: the traceback, then death by SIGINT.
        traceback.print_exc()
        _flush()
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
        code = 128 + signal.SIGINT
    except BaseException:  # noqa: BLE001 (any failure is the rank's, reported as the interpreter would)
        traceback.print_exc()
        code = 1
    # The interpreter waits for the rank's non-daemon threads before it exits (a checkpoint being written);
    # os._exit below would not, so wait here as multiprocessing's forked children do.
    shutdown: Callable[[], None] | None = getattr(threading, "_shutdown", None)
    if shutdown is not None:
        with contextlib.suppress(Exception):
            shutdown()
    return code


def _rank(
    module: ModuleType, args: list[str], replacement: int, parent: int, go: int, close: Sequence[int]
) -> NoReturn:
    """The forked child: becomes the rank once its parent says ``go`` (else exits at once), and never returns
    (``os._exit``: the warm parent's atexit handlers and buffers are not the rank's to run)."""
    code = 1
    try:
        parent_death.die_with_parent(signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(128 + signal.SIGKILL)  # the warm parent died before the request took hold
        for fd in close:
            os.close(fd)  # the guard must see the warm parent's pipes end when the warm parent does
        told = os.read(go, 1)
        os.close(go)
        if told != b"1":
            os._exit(0)
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if replacement:
            os.environ[REPLACEMENT_ENV] = str(replacement)
        code = _run_main(module, args)
    finally:
        _flush()
        os._exit(code)


class _WarmParent:
    def __init__(self, name: str, module: ModuleType, args: list[str], commands: int, reports: int) -> None:
        self._name = name
        self._module = module
        self._args = args
        self._commands = commands
        self._reports = reports
        self._rank: int | None = None
        """The pid of the live rank."""
        self._rank_fd: int | None = None
        """A pidfd of the live rank: readable once it has exited."""

    def _forward(self, number: int, _frame: object) -> None:
        rank = self._rank
        if rank is not None:
            with contextlib.suppress(ProcessLookupError):  # exited, not reaped yet: the pid is still its own
                os.kill(rank, number)

    def _start(self, replacement: int) -> None:
        go_in, go_out = os.pipe()
        parent = os.getpid()
        _flush()  # whatever preload left buffered would be written twice, by the rank too
        pid = os.fork()
        if pid == 0:
            os.close(go_out)
            _rank(self._module, self._args, replacement, parent, go_in, (self._commands, self._reports))
        os.close(go_in)
        # No thread may run at a fork: checked here, in the parent right after it (/proc/self/task holds this one
        # thread), as no thread starts in between. Checking before it would be wrong the other way: numpy's
        # OpenBLAS keeps a pool of threads, idle, that its own fork handler stops before the fork (and restarts on
        # its next call), so they are there just before and gone at the fork. Until told, the rank waits.
        threads = threads_running()
        if len(threads) == 1:
            os.write(go_out, b"1")
            os.close(go_out)
        else:
            os.close(go_out)  # the rank exits without running anything
            os.waitpid(pid, 0)
            print(
                f"megascope warm parent: {len(threads)} threads ({', '.join(threads)}) running at the fork after "
                f"preloading {self._name}: the rank starts as a fresh process instead (slower; a forked rank would "
                "inherit the locks they hold)",
                file=sys.stderr,
                flush=True,
            )
            env = dict(os.environ, **({REPLACEMENT_ENV: str(replacement)} if replacement else {}))
            program = [sys.executable, "-u", "-m", MODULE, RUN_FLAG, "-m", self._name, *self._args]
            command = parent_death.command(signal.SIGKILL, program)
            pid = os.posix_spawn(command[0], command, env)
        self._rank, self._rank_fd = pid, os.pidfd_open(pid)
        self._send(f"started {pid}")

    def _reap(self) -> None:
        assert self._rank is not None and self._rank_fd is not None
        pid = self._rank
        _, status = os.waitpid(pid, 0)
        os.close(self._rank_fd)
        self._rank = self._rank_fd = None
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                os.write(fd, EXITED_MARK)
        self._send(f"exited {pid} {os.waitstatus_to_exitcode(status)}")

    def _send(self, message: str) -> None:
        with contextlib.suppress(OSError):  # the guard is gone: the next read of its pipe ends this process
            os.write(self._reports, f"{message}\n".encode())

    def _stop(self) -> int:
        """Quit: a rank still live goes too (it would, by PR_SET_PDEATHSIG, as this process exits)."""
        if self._rank is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._rank, signal.SIGKILL)
            os.waitpid(self._rank, 0)
        return 0

    def serve(self) -> int:
        for sig in _FORWARDED:
            signal.signal(sig, self._forward)
        self._start(0)
        pending = b""
        while True:
            watched = [self._commands] + ([self._rank_fd] if self._rank_fd is not None else [])
            ready, _, _ = select.select(watched, [], [])  # retried after a forwarded signal (PEP 475)
            if self._rank_fd is not None and self._rank_fd in ready:
                self._reap()
            if self._commands not in ready:
                continue
            data = os.read(self._commands, 4096)
            if not data:
                return self._stop()  # the guard is gone
            pending += data
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                words = line.decode(errors="replace").split()
                if words == ["quit"]:
                    return self._stop()
                if len(words) == 2 and words[0] == "fork" and words[1].isdigit() and self._rank is None:
                    self._start(int(words[1]))
                else:
                    print(f"megascope warm parent: ignored {line!r} (rank live: {self._rank})", file=sys.stderr)


def _parse(argv: Sequence[str]) -> tuple[int, int, str, list[str]]:
    """``(IN, OUT, MODULE, ARGS)``; IN and OUT are -1 with :data:`RUN_FLAG`."""
    if len(argv) >= 3 and argv[0] == RUN_FLAG and argv[1] == "-m":
        return -1, -1, argv[2], list(argv[3:])
    if len(argv) < 3 or not argv[0].startswith(f"{PIPE_FLAG}=") or argv[1] != "-m":
        raise ValueError(_USAGE)
    fds = argv[0].partition("=")[2].split(",")
    if len(fds) != 2 or not all(fd.isdigit() for fd in fds):
        raise ValueError(f"{PIPE_FLAG}: two file descriptors IN,OUT, got {argv[0]!r}; {_USAGE}")
    return int(fds[0]), int(fds[1]), argv[2], list(argv[3:])


def main() -> int:
    try:
        commands, reports, name, args = _parse(sys.argv[1:])
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    if commands >= 0:
        for fd in (commands, reports):
            os.set_inheritable(fd, False)  # a rank started fresh (not forked) must not hold them
    # Before the import, as ``python -m`` has it: the module may read its own arguments.
    sys.argv = [name, *args]
    module = importlib.import_module(name)
    preload = getattr(module, "preload", None)
    if callable(preload):
        preload(args)
    if commands < 0:
        _flush()
        return _run_main(module, args)
    return _WarmParent(name, module, args, commands, reports).serve()


class WarmParentLink:
    """The guard's end: starts the warm parent for ``-m MODULE ARGS`` (``entry``) and exchanges its messages.

    ``process`` is the warm parent (its stdout and stderr are pipes: the rank's output, every rank's in turn)."""

    def __init__(self, entry: Sequence[str]) -> None:
        commands_in, commands_out = os.pipe()
        reports_in, reports_out = os.pipe()
        program = [sys.executable, "-u", "-m", MODULE, f"{PIPE_FLAG}={commands_in},{reports_out}", *entry]
        self.process = subprocess.Popen(
            parent_death.command(signal.SIGKILL, program),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(commands_in, reports_out),
        )
        os.close(commands_in)
        os.close(reports_out)
        self._commands: int | None = commands_out
        self._reports: IO[bytes] = os.fdopen(reports_in, "rb")

    def read(self) -> tuple[str, int, int] | None:
        """The next message: ``("started", pid, 0)`` or ``("exited", pid, code)``; None once the warm parent is
        gone (it died, or quit)."""
        while True:
            line = self._reports.readline()
            if not line:
                return None
            words = line.decode(errors="replace").split()
            if len(words) == 2 and words[0] == "started":
                return "started", int(words[1]), 0
            if len(words) == 3 and words[0] == "exited":
                return "exited", int(words[1]), int(words[2])

    def fork(self, replacement: int) -> bool:
        """Ask for the rank's ``replacement``-th replacement; False if the warm parent is gone."""
        return self._send(f"fork {replacement}")

    def _send(self, message: str) -> bool:
        if self._commands is None:
            return False
        try:
            os.write(self._commands, f"{message}\n".encode())
        except OSError:  # BrokenPipeError: the warm parent died
            return False
        return True

    def quit(self, timeout: float = 5.0) -> int:
        """Tell the warm parent to quit and wait for it (killed past ``timeout``); its exit status."""
        self._send("quit")
        if self._commands is not None:
            os.close(self._commands)
            self._commands = None
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._reports.close()
        return self.process.returncode


if __name__ == "__main__":
    sys.exit(main())
