"""The run of one rank: what ``megascope.api`` does behind its functions (see the package docstring).

The training thread's share of ``step()`` is kept to reading one clock and queueing a tuple: the StepReport is
built on the telemetry thread (:meth:`Run._build_step`), tensors are read there too (and not even looked at on the
loop's thread unless CUDA is in use), so neither the proto's construction nor a device sync lands on the loop. The
loop calls ``step()`` after its own work, when little of megascope's or torch's code is in the CPU's caches: each
attribute or call costs it microseconds there, not the tens of nanoseconds a benchmark loop of ``step()`` shows.
Without an agent and without a run directory the run is inactive: every function returns after one attribute test.
"""

from __future__ import annotations

import atexit
import contextlib
import faulthandler
import gc
import math
import os
import queue
import signal
import socket
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, TextIO

from megascope.engine.runtime.run_dir import stacks_file, telemetry_file
from megascope.engine.runtime.telemetry import ConsoleSink, Event, JsonlSink, Signal, Sink, StepReport, Telemetry
from megascope.protos.events import CRITICAL, ERROR, INFO, WARNING, make_event
from megascope.protos.megascope.v1 import worker_pb2

if TYPE_CHECKING:
    from megascope.engine.collectives import CollectiveTimer, _Record
    from megascope.engine.runtime.agent_link import AgentSink

RUN_DIR_ENV = "MEGASCOPE_RUN_DIR"
"""Where a script's telemetry file and stack files go (``init(run_dir=...)`` wins over it)."""
MAX_SCALARS = 64
"""Scalars kept per step report (the first ones given): a report is meant to stay a few hundred bytes."""
MAX_SCALAR_NAME_CHARS = 128
"""A longer scalar name is left out (the agent refuses longer names elsewhere on the wire too)."""
FAILURE_TRACEBACK_LINES = 20
FINISH_CONNECT_SECONDS = 5.0
"""How long ``finish()`` waits for a link that is not (yet) connected: a "finished" that never reaches the agent
turns a clean run into a crash there, so a short script's exit is worth a short wait."""
FLUSH_SECONDS = 5.0
"""How long ``finish()`` and a failure wait for what is queued to be delivered."""
PHASES = ("data", "forward", "backward", "optimizer", "comm")
"""Phase names that fill the step-time breakdown; any other phase becomes the scalar ``<name>_seconds``."""
_SEVERITIES = {"info": INFO, "warning": WARNING, "error": ERROR, "critical": CRITICAL}
USER_EVENT_KIND = "user"
"""The kind of an event a script sends with ``event()``."""

_NOT_HANDLED = (
    "this rank runs its own training loop through megascope.api, which cannot {what} on command; "
    "{instead} (a loop that can: init(handle_commands=True))"
)
_REFUSALS = {
    worker_pb2.COMMAND_KIND_CHECKPOINT: _NOT_HANDLED.format(
        what="save a checkpoint", instead="save from the script itself, every N steps"
    ),
    worker_pb2.COMMAND_KIND_STOP: _NOT_HANDLED.format(
        what="stop at a step boundary", instead="stopping it takes a signal instead"
    ),
}


class GcPauses:
    """Total time spent in garbage collection, from ``gc.callbacks`` (a host stall the step pays for)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._started = 0.0
        gc.callbacks.append(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._started

    def close(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)


class _Phase:
    """``with run.phase(name):`` adds the block's wall time to the name's total for the step under way."""

    __slots__ = ("_name", "_run", "_started")

    def __init__(self, run: Run, name: str) -> None:
        self._run = run
        self._name = name
        self._started = 0.0

    def __enter__(self) -> None:
        self._started = time.perf_counter()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        # Looked up at the end, not the start: a block that spans a step() counts in the step it ends in.
        phases = self._run._phases
        phases[self._name] = phases.get(self._name, 0.0) + (time.perf_counter() - self._started)


class _NoPhase:
    """The phase of an inactive run: nothing timed."""

    __slots__ = ()

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        return None


_NO_PHASE = _NoPhase()


class _Unreadable(Exception):
    """A value given to ``step()`` that is not a number; named in the one warning."""


class Run:
    """One rank's link to megascope: made by :func:`init`; see the package docstring for what it does."""

    def __init__(
        self,
        *,
        run_dir: str | Path | None = None,
        console_every: int = 0,
        handle_commands: bool = False,
        enabled: bool = True,
    ) -> None:
        env = os.environ
        self.rank = _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", 0)
        self.world_size = _env_int("WORLD_SIZE", 1)
        self.restart_count = _env_int("TORCHELASTIC_RESTART_COUNT", 0)
        self.node = env.get("MEGASCOPE_NODE") or socket.gethostname()
        self.run_id = env.get("TORCHELASTIC_RUN_ID", "")
        directory = run_dir if run_dir is not None else env.get(RUN_DIR_ENV) or None
        self.run_dir = Path(directory) if directory is not None else None
        self.errors = 0
        """Errors megascope met and swallowed (bad arguments, a failed sink): training never sees them."""
        self.last_step = 0
        """The number of the last step reported."""
        self.telemetry: Telemetry | None = None
        self.agent: AgentSink | None = None
        self.stack_file: Path | None = None
        self.collectives: CollectiveTimer | None = None
        self._pid = os.getpid()
        self._warned = False
        self._failed = False
        self._done = False
        self._mark: float | None = None
        self._cpu_mark = time.process_time()
        self._phases: dict[str, float] = {}
        self._gc: GcPauses | None = None
        self._gc_mark = 0.0
        self._cuda = False
        """Whether this process has initialized CUDA (then ``step()`` notes the stream of CUDA values): checked on the
        telemetry thread (:meth:`_cuda_now`), as the loop's thread would pay more for the check than for its step."""
        self._handle_commands = handle_commands
        self._commands: queue.SimpleQueue[worker_pb2.Command] = queue.SimpleQueue()
        self._stacks: TextIO | None = None
        self._previous_excepthook: Callable[..., Any] | None = None

        from megascope.engine.runtime.agent_link import AGENT_ADDRESS_ENV

        under_agent = bool(env.get(AGENT_ADDRESS_ENV))
        if not enabled or (not under_agent and self.run_dir is None):
            return  # inactive: no thread, no file, no handler
        sinks: list[Sink] = []
        if self.run_dir is not None:
            sinks.append(JsonlSink(telemetry_file(self.run_dir, self.rank)))
        if console_every > 0:
            sinks.append(ConsoleSink(every=console_every))
        self.telemetry = Telemetry(sinks)
        self._gc = GcPauses()
        self._install_stack_dumps()
        if under_agent:
            self._connect()
        self._previous_excepthook = sys.excepthook
        sys.excepthook = self._excepthook
        atexit.register(self._at_exit)
        self._cuda_now()
        self._mark = time.perf_counter()

    @property
    def active(self) -> bool:
        """Whether this run reports anywhere (an agent or a run directory); an inactive run does nothing."""
        return self.telemetry is not None

    @property
    def gc_pause_seconds(self) -> float:
        """Time spent in garbage collection since ``init()``."""
        return self._gc.total if self._gc is not None else 0.0

    # -- set-up ----------------------------------------------------------------------------------------------------

    def _install_stack_dumps(self) -> None:
        """SIGUSR1 appends every thread's Python stack to the stack file; fatal signals dump to stderr.

        faulthandler writes from the signal handler itself, in C: it answers even when the main thread is blocked
        inside a collective and never returns to the interpreter, which a Python-level handler would not. A
        SIGUSR1 handler the script installed before is chained (called after the dump); with none, SIGUSR1's
        default action (terminate) must not run, so nothing is chained.
        """
        try:
            base = self.run_dir if self.run_dir is not None else _default_run_dir(self.run_id)
            path = stacks_file(base, self.rank).resolve()
            path.parent.mkdir(parents=True, exist_ok=True)
            self._stacks = path.open("a")  # kept open for the life of the process: the handler writes to its fd
            previous = signal.getsignal(signal.SIGUSR1)
            faulthandler.register(signal.SIGUSR1, file=self._stacks, all_threads=True, chain=callable(previous))
            self.stack_file = path
        except (OSError, ValueError, RuntimeError) as error:
            self._error("the stack dump (SIGUSR1) could not be installed", error)
        if not faulthandler.is_enabled():
            # A stderr without a file descriptor (a notebook): fatal signals go unreported, as without megascope.
            with contextlib.suppress(OSError, ValueError, AttributeError, RuntimeError):
                faulthandler.enable(file=sys.stderr, all_threads=True)

    def _connect(self) -> None:
        from megascope.engine.runtime.agent_link import connect_from_environment

        try:
            self.agent = connect_from_environment(
                self.rank, self.local_rank, self.world_size, self.node, self.restart_count, self._on_command,
                stack_file=str(self.stack_file or ""),
                collectives_issued=lambda: self.collectives.issued if self.collectives is not None else 0,
            )  # fmt: skip
        except Exception as error:
            self._error("the link to the agent could not be opened", error)
            return
        if self.agent is not None and self.telemetry is not None:
            self.telemetry.add_sink(self.agent)

    # -- the step --------------------------------------------------------------------------------------------------

    def phase(self, name: str) -> _Phase | _NoPhase:
        if self.telemetry is None:
            return _NO_PHASE
        return _Phase(self, name)

    def batches(self, iterable: Iterable[Any]) -> Iterator[Any]:
        if self.telemetry is None:
            yield from iterable
            return
        iterator = iter(iterable)
        while True:
            started = time.perf_counter()
            try:
                item = next(iterator)
            except StopIteration:
                return
            phases = self._phases
            phases["data"] = phases.get("data", 0.0) + (time.perf_counter() - started)
            yield item

    def step(
        self,
        loss: object,
        tokens: object,
        lr: object,
        grad_norm: object,
        samples: object,
        step: object,
        scalars: dict[str, object],
    ) -> None:
        """The training thread's part of ``step()``: clocks, a step number, and a tuple on the queue."""
        telemetry = self.telemetry
        if telemetry is None or self._done:
            return
        now = time.perf_counter()
        started, self._mark = self._mark, now
        if type(step) is int and step >= 0:
            number = step
        else:
            if step is not None:
                self._bad_argument("step", step)
            number = self.last_step + 1
        self.last_step = number
        phases = self._phases
        if phases:
            self._phases = {}
        records = issued = None
        if self.collectives is not None:
            records = self.collectives.take()
            issued = self.collectives.issued
        gc = self._gc
        # No tensor is looked at here unless CUDA is in use (for the stream): the loop reaches this after the step's
        # own work, with torch's bindings cold, and each tensor attribute costs it ~10 us on a VM, more than all the
        # rest. The loss is not detached either: the report holds it only until the telemetry thread reads it (tens
        # of ms), no longer than the loop's own ``loss`` variable keeps its graph (until the next step's loss).
        stream = _cuda_stream(loss, grad_norm, lr, scalars) if self._cuda else None
        telemetry.deferred_step(
            self._build_step,
            (number, loss, tokens, lr, grad_norm, samples, scalars, started, now, gc.total if gc is not None else 0.0,
             phases, records, issued, stream),
        )  # fmt: skip

    def _cuda_now(self) -> bool:
        """Whether CUDA is in use, noted for ``step()`` once it is (it stays initialized for the process's life)."""
        if not self._cuda and _cuda_initialized():
            self._cuda = True
        return self._cuda

    def _build_step(
        self,
        number: int,
        loss: object,
        tokens: object,
        lr: object,
        grad_norm: object,
        samples: object,
        scalars: dict[str, object],
        started: float | None,
        now: float,
        gc_total: float,
        phases: dict[str, float],
        records: list[_Record] | None,
        issued: int | None,
        stream: object,
    ) -> StepReport | None:
        """The StepReport of one ``step()`` call; runs on the telemetry thread. Bad values are left out."""
        try:
            step_seconds = now - started if started is not None else 0.0
            # The wall clock at the step's end, from the loop's perf_counter reading: one clock read less on the
            # loop's thread (the two clocks drift apart by far less than a microsecond in the time a report waits).
            wall_time = time.time() - (time.perf_counter() - now)
            # Builds run in step order on this one thread, so the GC mark is this thread's alone.
            gc_seconds, self._gc_mark = gc_total - self._gc_mark, gc_total
            if stream is None and self._cuda_now():
                # Queued before the loop knew CUDA was in use (this thread notices it, at the first build after it
                # began), so without the stream its values were computed on: wait for all of the device's work.
                _synchronize_cuda_values(loss, grad_norm, lr, scalars)
            # The process's CPU time is read here, not on the loop's thread (a system call: ~3 us on a VM); the
            # difference between two builds is the step's, give or take how late each was built.
            cpu = time.process_time()
            cpu_seconds, self._cpu_mark = cpu - self._cpu_mark, cpu
            report = StepReport(
                node=self.node,
                rank=self.rank,
                local_rank=self.local_rank,
                world_size=self.world_size,
                step=number,
                step_seconds=step_seconds,
                gc_pause_seconds=gc_seconds,
                cpu_seconds=max(0.0, cpu_seconds) if started is not None else 0.0,
                restart_count=self.restart_count,
                wall_time=wall_time,
            )
            extra: dict[str, float] = {}
            with _on_stream(stream):
                value = self._read("loss", loss, finite=False)
                if value is not None:
                    report.loss = value
                value = self._read("lr", lr)
                if value is not None:
                    report.lr = value
                value = self._read("grad_norm", grad_norm)
                if value is not None:
                    report.grad_norm = value
                count = self._read("tokens", tokens)
                if count is not None and count >= 0:
                    report.tokens = int(count)
                    if step_seconds > 0:
                        report.tokens_per_second = int(count) / step_seconds
                count = self._read("samples", samples)
                if count is not None and count >= 0:
                    extra["samples"] = count
                    if step_seconds > 0:
                        extra["samples_per_second"] = count / step_seconds
                for name, given in scalars.items():
                    if len(extra) >= MAX_SCALARS:
                        break
                    if len(name) > MAX_SCALAR_NAME_CHARS:
                        self._bad_argument(name[:40] + "...", "(a name longer than 128 characters)")
                        continue
                    value = self._read(name, given)
                    if value is not None:
                        extra[name] = value
            for name, seconds in _split_phases(report, phases, records, started).items():
                if len(extra) < MAX_SCALARS:
                    extra[f"{name}_seconds"] = seconds
            if issued is not None:
                report.collectives_issued = issued
            if extra:
                report.scalars.update(extra)
            return report
        except Exception as error:
            self._error("a step report could not be built", error)
            return None

    # -- everything else a rank says -------------------------------------------------------------------------------

    def report(self, report: StepReport) -> None:
        """Send a complete StepReport built by the caller (megascope's trainer: collectives, MFU, validation)."""
        self.last_step = report.step
        if self.telemetry is not None:
            self.telemetry.step(report)

    def emit(self, event: Event) -> None:
        """Send an event built by the caller (``make_event``), on any thread."""
        if self.telemetry is not None:
            self.telemetry.event(event)

    def signal(self, message: Signal) -> None:
        """Send a lifecycle signal (a self-check result, ...); a finished or failure goes through finish()/fail()."""
        if self.telemetry is not None:
            self.telemetry.signal(message)

    def event(self, text: str, severity: str = "info") -> None:
        if self.telemetry is None:
            return
        level = _SEVERITIES.get(severity) if isinstance(severity, str) else None
        if level is None:
            self._bad_argument("severity", severity)
            level = INFO
        self.telemetry.event(
            make_event(str(text), kind=USER_EVENT_KIND, severity=level, node=self.node, rank=self.rank,
                       step=self.last_step)
        )  # fmt: skip

    def comm_hook(self, ddp_model: Any, group: Any = None) -> CollectiveTimer | None:
        """Register the timing all-reduce hook on a DDP model (see the package docstring); the timer, or None."""
        if self.telemetry is None:
            return None
        from megascope.engine.collectives import CollectiveTimer

        timer = CollectiveTimer(group)
        ddp_model.register_comm_hook(None, timer.hook)
        self.collectives = timer
        return timer

    # -- commands from the agent -----------------------------------------------------------------------------------

    def _on_command(self, command: worker_pb2.Command) -> None:
        # On the link's thread. A loop that handles commands takes them between steps; any other is told no now,
        # so that the operator reads why instead of waiting for a timeout.
        if self._handle_commands:
            self._commands.put(command)
            return
        self.answer(command, False, _REFUSALS.get(command.kind, f"unknown command kind {command.kind}"))

    def pending_commands(self) -> Iterator[worker_pb2.Command]:
        """The commands that arrived since the last call (with ``init(handle_commands=True)``); answer each."""
        while True:
            try:
                yield self._commands.get_nowait()
            except queue.Empty:
                return

    def answer(self, command: worker_pb2.Command, ok: bool, message: str) -> None:
        """Answer a command (the agent waits for it): done or refused, and why."""
        self.signal(worker_pb2.CommandAck(command_id=command.id, ok=ok, message=message))

    # -- the end ---------------------------------------------------------------------------------------------------

    def fail(self, error: BaseException) -> None:
        """Report ``error`` (its traceback's last lines) as this rank's failure; no "finished" follows it."""
        if self._failed or self._done or os.getpid() != self._pid:
            return
        self._failed = True
        if self.telemetry is None:
            return
        lines = "".join(traceback.format_exception(type(error), error, error.__traceback__)).rstrip().splitlines()
        self.telemetry.signal(
            worker_pb2.ExitReport(
                rank=self.rank,
                local_rank=self.local_rank,
                pid=self._pid,
                exit_code=1,  # what an unhandled exception makes of the process
                wall_time=time.time(),
                log_tail=lines[-FAILURE_TRACEBACK_LINES:] or [f"{type(error).__name__}: {error}"[:500]],
                restart_count=self.restart_count,
            )
        )

    def finish(self, steps: int | None = None, param_digest: str = "") -> None:
        """Tell the agent this rank finished (unless a failure was reported), then flush and close. Idempotent."""
        if self._done or os.getpid() != self._pid:
            return
        if self.telemetry is not None and not self._failed:
            self._wait_for_link()
            finished = worker_pb2.RankFinished(steps=self.last_step if steps is None else steps)
            finished.param_digest = param_digest
            self.telemetry.signal(finished)
        self.close()

    def close(self) -> None:
        """Deliver what is queued (a few seconds at most) and stop, with no signal: for a caller that exits
        without finishing (an error it reports itself). Idempotent."""
        if self._done or os.getpid() != self._pid:
            return
        self._done = True
        atexit.unregister(self._at_exit)
        if self._gc is not None:
            self._gc.close()
        if self.telemetry is not None:
            self.telemetry.close(timeout=FLUSH_SECONDS)

    def _wait_for_link(self) -> None:
        agent = self.agent
        deadline = time.monotonic() + FINISH_CONNECT_SECONDS
        while agent is not None and not agent.connected and time.monotonic() < deadline:
            time.sleep(0.02)

    def _excepthook(self, kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
        with contextlib.suppress(Exception):  # the report is lost, the traceback below is not
            self.fail(error)
        previous = self._previous_excepthook or sys.__excepthook__
        try:
            previous(kind, error, tb)
        finally:
            with contextlib.suppress(Exception):
                self.close()

    def _at_exit(self) -> None:
        with contextlib.suppress(Exception):  # at interpreter exit there is nobody left to tell
            self.finish()

    # -- values given by the script --------------------------------------------------------------------------------

    def _read(self, name: str, value: object, finite: bool = True) -> float | None:
        """``value`` as a float (a 0-d tensor is read here, on the telemetry thread), or None when it is not one."""
        if value is None:
            return None
        try:
            number = _as_float(value)
        except _Unreadable:
            self._bad_argument(name, value)
            return None
        except Exception as error:  # a tensor that cannot be read (a freed device, a closed stream)
            self._error(f"step({name}=...) could not be read", error)
            return None
        if finite and not math.isfinite(number):
            return None
        return number

    def _bad_argument(self, name: str, value: object) -> None:
        text = repr(value)
        text = text if len(text) <= 60 else text[:57] + "..."
        self._error(f"step({name}={text}): not a number, left out of the report", None)

    def _error(self, what: str, error: BaseException | None) -> None:
        """Count an error megascope swallowed; the first one is also said on stderr (the rest only counted)."""
        self.errors += 1
        if self._warned:
            return
        self._warned = True
        cause = f" ({type(error).__name__}: {error})" if error is not None else ""
        with contextlib.suppress(Exception):  # a closed stderr: counted above
            print(
                f"megascope: rank {self.rank}: {what}{cause}; training goes on unaffected "
                "(further problems are counted in megascope.api.current().errors, without a warning)",
                file=sys.stderr,
                flush=True,
            )


def _split_phases(
    report: StepReport, phases: dict[str, float], records: list[_Record] | None, started: float | None
) -> dict[str, float]:
    """Fill the step-time breakdown from the step's phases and collectives; return the other phases by name.

    With the comm hook, the loop was blocked on communication from the last bucket's launch (backward compute
    done) to the last collective's end: DDP's backward waits for every bucket. That wait is inside a "backward"
    phase when there is one, so it is moved from there to ``comm_wait``, as the trainer splits it.
    """
    others = {str(name): seconds for name, seconds in phases.items() if name not in PHASES}
    data = phases.get("data", 0.0)
    forward = phases.get("forward", 0.0)
    backward = phases.get("backward", 0.0)
    optimizer = phases.get("optimizer", 0.0)
    comm = phases.get("comm", 0.0)
    if records:
        from megascope.engine.collectives import collective_timings

        launched = max(r.launched for r in records)
        done = max(r.done if r.done is not None else r.launched for r in records)
        blocked = max(0.0, done - launched)
        comm += blocked
        backward = max(0.0, backward - blocked) if backward else 0.0
        if started is not None:
            report.collectives.extend(collective_timings(records, started, launched))
    report.data_wait_seconds = data
    report.forward_seconds = forward
    report.backward_seconds = backward
    report.optimizer_seconds = optimizer
    report.comm_wait_seconds = comm
    report.other_seconds = max(0.0, report.step_seconds - (data + forward + backward + optimizer + comm))
    return others


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def _default_run_dir(run_id: str) -> Path:
    """Where a script's stack files go when no run directory was given: private to this user, one per job."""
    base = Path(tempfile.gettempdir()) / f"megascope-{os.getuid()}"
    base.mkdir(mode=0o700, exist_ok=True)
    return base / (run_id or "run")


def _as_float(value: object) -> float:
    if isinstance(value, float | int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str | bytes | bool):
        raise _Unreadable
    item = getattr(value, "item", None)
    if item is not None:
        numel = getattr(value, "numel", None)
        if callable(numel) and numel() != 1:
            raise _Unreadable
        result = item()
        if isinstance(result, float | int) and not isinstance(result, bool):
            return float(result)
        raise _Unreadable
    if hasattr(value, "__float__"):
        return float(value)  # type: ignore[arg-type]
    raise _Unreadable


_PLAIN = (float, int, type(None))


def _cuda_initialized() -> bool:
    """Whether this process has initialized CUDA: until it has, no value can be a CUDA tensor."""
    torch = sys.modules.get("torch")
    return torch is not None and bool(torch.cuda.is_initialized())


def _cuda_stream(loss: object, grad_norm: object, lr: object, scalars: dict[str, object]) -> object:
    """The current CUDA stream when one of the values is a CUDA tensor: it is read on that stream, after the
    kernels that computed it, on the telemetry thread."""
    for value in (loss, grad_norm, lr, *scalars.values()):
        if type(value) in _PLAIN:
            continue  # the common case, without an attribute lookup
        if getattr(value, "is_cuda", False):
            import torch

            return torch.cuda.current_stream(value.device)  # type: ignore[attr-defined]
    return None


def _synchronize_cuda_values(loss: object, grad_norm: object, lr: object, scalars: dict[str, object]) -> None:
    """Wait, on the telemetry thread, for all the work queued on the device of the first CUDA value (if any): its
    kernels may run on any stream."""
    for value in (loss, grad_norm, lr, *scalars.values()):
        if type(value) not in _PLAIN and getattr(value, "is_cuda", False):
            import torch

            torch.cuda.synchronize(value.device)  # type: ignore[attr-defined]
            return


class _on_stream:  # noqa: N801 (used as a context manager, like contextlib's)
    def __init__(self, stream: object) -> None:
        self._context: Any = None
        if stream is not None:
            import torch

            self._context = torch.cuda.stream(stream)  # type: ignore[arg-type]

    def __enter__(self) -> None:
        if self._context is not None:
            self._context.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._context is not None:
            self._context.__exit__(*exc)


# -- the module's functions (megascope.api.*): each catches its own errors -----------------------------------------

_RUN: Run | None = None
_INIT_LOCK = threading.Lock()
_NO_SCALARS: dict[str, object] = {}


def init(*, run_dir: str | Path | None = None, console_every: int = 0, handle_commands: bool = False) -> Run:
    """The run of this rank, made at the first call (the later calls' arguments are ignored); never raises."""
    global _RUN
    run = _RUN
    if run is not None:
        return run
    with _INIT_LOCK:
        if _RUN is None:
            try:
                _RUN = Run(run_dir=run_dir, console_every=console_every, handle_commands=handle_commands)
            except Exception as error:
                _RUN = Run(enabled=False)
                _RUN._error("megascope could not start; this rank runs without it", error)
        return _RUN


def current() -> Run | None:
    """The run ``init()`` made, or None before the first call."""
    return _RUN


def step(
    loss: object = None,
    tokens: object = None,
    *,
    lr: object = None,
    grad_norm: object = None,
    samples: object = None,
    step: object = None,
    **scalars: object,
) -> None:
    """The end of one training step (see the package docstring)."""
    run = _RUN
    if run is None:
        run = init()
        run._mark = None  # made by this very call: the step's start is unknown
    if run.telemetry is None:
        return
    try:
        run.step(loss, tokens, lr, grad_norm, samples, step, scalars or _NO_SCALARS)
    except Exception as error:
        run._error("step() failed", error)


def phase(name: str) -> Any:
    """``with megascope.phase("data"):`` times a part of the step (see the package docstring)."""
    run = _RUN or init()
    return run.phase(name)


def batches(iterable: Iterable[Any]) -> Iterator[Any]:
    """``for batch in megascope.batches(loader):`` times each batch's wait as the data phase."""
    run = _RUN or init()
    return run.batches(iterable)


def comm_hook(ddp_model: Any, group: Any = None) -> None:
    """Time a DDP model's gradient all-reduces (see the package docstring); does nothing without an agent."""
    run = _RUN or init()
    try:
        run.comm_hook(ddp_model, group)
    except Exception as error:
        run._error("comm_hook() could not register the hook; DDP keeps its own", error)


def event(text: str, severity: str = "info") -> None:
    """A line in the agent's event log."""
    run = _RUN or init()
    try:
        run.event(text, severity)
    except Exception as error:
        run._error("event() failed", error)


def finish() -> None:
    """This rank finished (also done by itself at a clean exit)."""
    run = _RUN
    if run is None:
        return
    try:
        run.finish()
    except Exception as error:
        run._error("finish() failed", error)


def default_tokens(batch: Any) -> int | None:
    """The token positions in ``batch``, the framework callbacks' default count: ``batch["input_ids"]`` or a leading
    integer tensor; None otherwise."""
    import torch

    ids = batch.get("input_ids") if isinstance(batch, Mapping) else None
    if ids is None and isinstance(batch, list | tuple) and batch:
        ids = batch[0]
    if ids is None:
        ids = batch
    if isinstance(ids, torch.Tensor) and not ids.is_floating_point() and not ids.is_complex():
        return ids.numel()
    return None
