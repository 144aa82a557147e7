"""Fault injection: ``--inject KIND:key=value,...`` on ``megascope train``, ``agent`` and ``demo``.

A fault is a small frozen dataclass, part of the run's :class:`~megascope.engine.config.TrainConfig` (so it is
written to ``config.json`` with everything else and every rank reads the same list). ``parse_fault`` turns one
``--inject`` value into one; ``fault_to_dict`` / ``fault_from_dict`` carry it through JSON.

Kinds:

- ``slow:rank=R,factor=F``: rank R's compute takes F times as long. Each step, once R's forward and backward
  compute is done and just before its last gradient bucket's all-reduce starts, R sleeps (F - 1) times the
  compute it just did. The sleep is therefore measured as R's backward compute, and the other ranks spend it
  blocked in the all-reduce, waiting for R: what a slow GPU looks like in a synchronous job.

- ``crash:rank=R,step=S[,how=kill|segv|exception|exit][,times=N]``: rank R dies when it reaches step S (before
  the step's first collective): SIGKILL (default, as the OOM killer does), SIGSEGV, a Python exception, or
  ``exit(1)``. It fires ``times`` times over the run's restarts (default once; 0: at every start, a restart
  storm).
- ``hang:rank=R,step=S[,how=sleep|stop]``: rank R stops making progress when it reaches step S: an endless
  Python loop (``sleep``, default) or SIGSTOP on itself (``stop``: its stacks cannot be collected, as with a
  process stuck in the kernel). The other ranks then block in the step's first all-reduce. Fires once.

A fault that fires once stays fired after the restart that follows it: a marker file under the run directory
(``faults/``, see run_dir.py) records each firing, so the restarted job runs past the step.

Checkpoint crash points (``MEGASCOPE_CKPT_CRASH_AT``, for crash-consistency tests) are fault injection too.

:class:`FaultInjector` is the one object that applies all of them: the trainer asks it at each step start
(:meth:`~FaultInjector.at_step`) and inside the step (:meth:`~FaultInjector.slow_down`), the checkpointer at
each stage of a save (:meth:`~FaultInjector.at_checkpoint`). Nothing else in the engine tests for a fault.

Adding a kind means: a dataclass here with ``kind`` and ``__post_init__`` validation, an entry in ``KINDS``, and
the code that applies it (in :class:`FaultInjector`). The parser itself needs no change: it fills a dataclass's
fields from the ``key=value`` pairs by their annotated types; fields with a default may be left out.

Pure Python with no torch import: the command line parses faults without loading torch.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import signal
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from megascope.engine.runtime.run_dir import fault_marker

FLAG = "--inject"

CRASH_POINT_ENV = "MEGASCOPE_CKPT_CRASH_AT"
"""Fault injection for crash-consistency tests: ``POINT[:RANK[:STEP]]`` SIGKILLs the process when a save (of
STEP) reaches POINT: stage, write, before_commit, commit (metadata written, not yet renamed) or publish
(renamed, ``latest`` not yet moved). Only in a job's first attempt, so a restarted job shows what it resumes
from rather than crashing again."""


class FaultError(ValueError):
    """A bad ``--inject`` value; the message says what is wrong with it."""


@dataclass(frozen=True)
class SlowFault:
    """``slow:rank=R,factor=F``: rank R's compute takes F times as long (see the module docstring)."""

    rank: int
    """The global rank to slow down."""
    factor: float
    """How many times longer the rank's forward + backward compute takes; must be more than 1."""
    kind: Literal["slow"] = field(default="slow", init=False)

    def __post_init__(self) -> None:
        if self.rank < 0:
            raise FaultError(f"slow: rank must be >= 0, got {self.rank}")
        if not self.factor > 1.0 or self.factor > 100.0:
            raise FaultError(f"slow: factor must be more than 1 and at most 100, got {self.factor:g}")

    def extra_seconds(self, compute_seconds: float) -> float:
        """How long to sleep after ``compute_seconds`` of real compute, so the total is ``factor`` times it."""
        return (self.factor - 1.0) * max(0.0, compute_seconds)

    def describe(self) -> str:
        return f"slow:rank={self.rank},factor={self.factor:g}"


CRASH_HOWS = ("kill", "segv", "exception", "exit")
HANG_HOWS = ("sleep", "stop")


def _check_rank_and_step(kind: str, rank: int, step: int) -> None:
    if rank < 0:
        raise FaultError(f"{kind}: rank must be >= 0, got {rank}")
    if step < 1:
        raise FaultError(f"{kind}: step must be >= 1 (steps count from 1), got {step}")


@dataclass(frozen=True)
class CrashFault:
    """``crash:rank=R,step=S[,how=...][,times=N]``: rank R dies on reaching step S (see the module docstring)."""

    rank: int
    step: int
    how: str = "kill"
    times: int = 1
    """How many starts of the rank fire it; 0 for every start (a rank that cannot get past step S)."""
    kind: Literal["crash"] = field(default="crash", init=False)

    def __post_init__(self) -> None:
        _check_rank_and_step("crash", self.rank, self.step)
        if self.how not in CRASH_HOWS:
            raise FaultError(f"crash: how must be one of {', '.join(CRASH_HOWS)}, got {self.how!r}")
        if self.times < 0:
            raise FaultError(f"crash: times must be >= 0 (0: every start), got {self.times}")

    def describe(self) -> str:
        return f"crash:rank={self.rank},step={self.step},how={self.how},times={self.times}"


@dataclass(frozen=True)
class HangFault:
    """``hang:rank=R,step=S[,how=sleep|stop]``: rank R stops making progress on reaching step S."""

    rank: int
    step: int
    how: str = "sleep"
    kind: Literal["hang"] = field(default="hang", init=False)

    def __post_init__(self) -> None:
        _check_rank_and_step("hang", self.rank, self.step)
        if self.how not in HANG_HOWS:
            raise FaultError(f"hang: how must be one of {', '.join(HANG_HOWS)}, got {self.how!r}")

    @property
    def times(self) -> int:
        return 1

    def describe(self) -> str:
        return f"hang:rank={self.rank},step={self.step},how={self.how}"


Fault = SlowFault | CrashFault | HangFault
"""Every fault kind."""

KINDS: dict[str, type[Fault]] = {"slow": SlowFault, "crash": CrashFault, "hang": HangFault}


def claim_firing(fault: CrashFault | HangFault, run_dir: str | Path) -> bool:
    """Whether ``fault`` should fire now; if so, records the firing first (so a crash cannot forget it).

    Each firing is one marker file ``faults/<fault>.<n>`` under the run directory, created exclusively:
    restarted ranks see how often the fault already fired and every start is counted exactly once.
    """
    _marker(run_dir, fault, 0).parent.mkdir(parents=True, exist_ok=True)
    fired = 0
    while True:
        if fault.times and fired >= fault.times:
            return False
        try:
            fd = os.open(_marker(run_dir, fault, fired), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            fired += 1
            continue
        os.fsync(fd)
        os.close(fd)
        return True


def is_spent(fault: CrashFault | HangFault, run_dir: str | Path) -> bool:
    """Whether ``fault`` has already fired as often as it may (so a restarted rank does not announce it again)."""
    if not fault.times:
        return False
    return _marker(run_dir, fault, fault.times - 1).exists()


def _marker(run_dir: str | Path, fault: CrashFault | HangFault, firing: int) -> Path:
    """The file that records firing number ``firing`` (from 0) of ``fault``."""
    return fault_marker(run_dir, fault.describe(), firing)


class FaultInjector:
    """Applies one rank's faults: its ``--inject`` faults and the checkpoint crash points of the environment.

    Built once per rank; ``run_dir`` holds the firing markers. Without faults it does nothing, cheaply.
    """

    def __init__(self, faults: Sequence[Fault] = (), rank: int = 0, run_dir: str | Path | None = None) -> None:
        self.rank = rank
        self.faults = faults_for_rank(faults, rank)
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.slow: SlowFault | None = next((f for f in self.faults if isinstance(f, SlowFault)), None)
        """This rank's slowdown, if any (the self-check measures with it too: a slow node looks slow there)."""
        self._at_steps = [f for f in self.faults if isinstance(f, CrashFault | HangFault)]

    def to_announce(self) -> list[Fault]:
        """The faults still to come: a crash or hang that fired before a restart will not fire again."""
        return [f for f in self.faults if not (isinstance(f, CrashFault | HangFault) and is_spent(f, self._dir()))]

    def slow_down(self, compute_seconds: float) -> None:
        """Called when the step's compute is done (``compute_seconds`` of it): sleeps as the slow fault says."""
        if self.slow is not None:
            time.sleep(self.slow.extra_seconds(compute_seconds))

    def at_step(self, step: int) -> None:
        """Injected crashes and hangs, at the start of the step they name (before its first collective)."""
        for fault in self._at_steps:
            if fault.step == step and claim_firing(fault, self._dir()):
                self._fire(fault, step)

    def _fire(self, fault: CrashFault | HangFault, step: int) -> None:
        # The event may not get out before the process dies: the agent learns of a crash on its own.
        print(f"megascope: rank {self.rank}: injecting {fault.describe()} at step {step}", flush=True)
        if isinstance(fault, HangFault):
            if fault.how == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
            while True:  # an endless loop: the process lives, answers signals, and never issues a collective
                time.sleep(0.05)
        elif fault.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault.how == "segv":
            ctypes.string_at(0)  # a read of address 0: a real SIGSEGV, as a bad native extension would cause
        elif fault.how == "exit":
            sys.stdout.flush()
            os._exit(1)
        else:
            raise RuntimeError(f"injected fault {fault.describe()} at step {step}")

    def at_checkpoint(self, point: str, step: int) -> None:
        """SIGKILL this process when a save of ``step`` reaches ``point`` and CRASH_POINT_ENV asks for it."""
        # Read at each point, not once: a point is reached a few times per save, and a test may set it late.
        name, rank, at_step = ([*os.environ.get(CRASH_POINT_ENV, "").split(":"), "", ""])[:3]
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        wanted = name == point and (not rank or int(rank) == self.rank) and (not at_step or int(at_step) == step)
        if wanted and first_attempt:
            os.kill(os.getpid(), signal.SIGKILL)

    def _dir(self) -> Path:
        if self.run_dir is None:
            raise ValueError("FaultInjector: crash and hang faults need the run directory (their firing markers)")
        return self.run_dir


def _field_value(kind: str, key: str, text: str, annotation: str) -> int | float | str:
    # Annotations are strings (``from __future__ import annotations``); faults have int, float and str fields.
    try:
        if annotation == "int":
            return int(text)
        if annotation == "float":
            return float(text)
    except ValueError:
        expected = "an integer" if annotation == "int" else "a number"
        raise FaultError(f"{kind}: {key} must be {expected}, got {text!r}") from None
    if annotation == "str":
        return text.lower()
    raise AssertionError(f"{kind}.{key}: unsupported field type {annotation}")


def parse_fault(text: str) -> Fault:
    """One ``--inject`` value, ``KIND:key=value,...``, as a fault. Raises :class:`FaultError`."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise FaultError(f"unknown fault kind {kind!r} in {text!r}; supported: {', '.join(KINDS)}")
    cls = KINDS[kind]
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls) if f.init}
    required = [f.name for f in dataclasses.fields(cls) if f.init and f.default is dataclasses.MISSING]
    usage = f"{kind}:" + ",".join(f"{name}=..." for name in required)
    if not sep or not rest.strip():
        raise FaultError(f"{text!r} gives no settings; write {usage}")
    values: dict[str, int | float | str] = {}
    for part in rest.split(","):
        key, eq, value = part.partition("=")
        key, value = key.strip().lower(), value.strip()
        if not eq or not key or not value:
            raise FaultError(f"{part.strip()!r} in {text!r} is not key=value; write {usage}")
        if key not in fields:
            raise FaultError(f"{kind}: unknown setting {key!r}; write {usage}")
        if key in values:
            raise FaultError(f"{kind}: {key} is given twice in {text!r}")
        values[key] = _field_value(kind, key, value, fields[key])
    missing = [name for name in required if name not in values]
    if missing:
        raise FaultError(f"{kind}: missing {', '.join(missing)}; write {usage}")
    return cls(**values)  # type: ignore[arg-type]


def inject_argument(text: str) -> Fault:
    """``argparse`` type for ``--inject``: a bad value becomes argparse's usage error (exit 2, no traceback)."""
    try:
        return parse_fault(text)
    except FaultError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def check_ranks(faults: Iterable[Fault], world_size: int) -> None:
    """Refuse faults aimed at a rank the job will not have, and faults that would clash on one rank.

    Two ``slow`` faults on one rank clash (one slowdown per rank); a crash or hang clashes only with one of its
    kind on the same rank at the same step: at different steps each fires on its own (one rank may crash at step
    100 and again at step 300).
    """
    seen: set[tuple[str, int, int]] = set()
    for fault in faults:
        if fault.rank >= world_size:
            last = world_size - 1
            raise FaultError(f"{fault.describe()}: the job has ranks 0..{last}, so rank {fault.rank} never runs")
        step = fault.step if isinstance(fault, CrashFault | HangFault) else 0
        if (fault.kind, fault.rank, step) in seen:
            at = f" at step {step}" if step else ""
            raise FaultError(f"two {fault.kind!r} faults for rank {fault.rank}{at}; give one")
        seen.add((fault.kind, fault.rank, step))


def faults_for_rank(faults: Sequence[Fault], rank: int) -> list[Fault]:
    return [f for f in faults if f.rank == rank]


def fault_to_dict(fault: Fault) -> dict[str, Any]:
    return dataclasses.asdict(fault)


def fault_from_dict(values: dict[str, Any]) -> Fault:
    """The inverse of :func:`fault_to_dict` (``config.json`` holds faults as ``{"kind": ..., ...}``)."""
    values = dict(values)
    kind = values.pop("kind", None)
    if kind not in KINDS:
        raise FaultError(f"unknown fault kind {kind!r} in the run config")
    return KINDS[kind](**values)
