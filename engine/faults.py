"""Fault injection: ``--inject KIND:key=value,...`` on ``megascope train``, ``agent`` and ``demo``.

A fault is a small frozen dataclass, part of the run's :class:`~megascope.engine.config.TrainConfig` (so it is
written to ``config.json`` with everything else and every rank reads the same list). ``parse_fault`` turns one
``--inject`` value into one; ``fault_to_dict`` / ``fault_from_dict`` carry it through JSON.

Kinds:

- ``slow:rank=R,factor=F``: rank R's compute takes F times as long. Each step, once R's forward and backward
  compute is done and just before its last gradient bucket's all-reduce starts, R sleeps (F - 1) times the
  compute it just did. The sleep is therefore measured as R's backward compute, and the other ranks spend it
  blocked in the all-reduce, waiting for R: what a slow GPU looks like in a synchronous job.

Planned (issue 5): ``crash:rank=R,step=S`` and ``hang:rank=R,step=S``; they are refused as not supported yet.
Adding a kind means: a dataclass here with ``kind`` and ``__post_init__`` validation, an entry in ``KINDS``, and
the code that applies it. The parser itself needs no change: it fills a dataclass's fields from the
``key=value`` pairs by their annotated types.

Pure Python with no torch import: the command line parses faults without loading torch.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

FLAG = "--inject"


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


Fault = SlowFault
"""Every fault kind (a union once there is more than one)."""

KINDS: dict[str, type[Fault]] = {"slow": SlowFault}
PLANNED_KINDS = ("crash", "hang")
"""Kinds a later issue adds; named here so the error says "not supported yet" rather than "unknown"."""


def _field_value(kind: str, key: str, text: str, annotation: str) -> int | float:
    # Annotations are strings (``from __future__ import annotations``); faults only have int and float fields.
    try:
        if annotation == "int":
            return int(text)
        if annotation == "float":
            return float(text)
    except ValueError:
        expected = "an integer" if annotation == "int" else "a number"
        raise FaultError(f"{kind}: {key} must be {expected}, got {text!r}") from None
    raise AssertionError(f"{kind}.{key}: unsupported field type {annotation}")


def parse_fault(text: str) -> Fault:
    """One ``--inject`` value, ``KIND:key=value,...``, as a fault. Raises :class:`FaultError`."""
    kind, sep, rest = text.strip().partition(":")
    kind = kind.strip().lower()
    if kind in PLANNED_KINDS:
        raise FaultError(f"{kind!r} faults are not supported yet; supported: {', '.join(KINDS)}")
    if kind not in KINDS:
        raise FaultError(f"unknown fault kind {kind!r} in {text!r}; supported: {', '.join(KINDS)}")
    cls = KINDS[kind]
    fields = {f.name: str(f.type) for f in dataclasses.fields(cls) if f.init}
    usage = f"{kind}:" + ",".join(f"{name}=..." for name in fields)
    if not sep or not rest.strip():
        raise FaultError(f"{text!r} gives no settings; write {usage}")
    values: dict[str, int | float] = {}
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
    missing = [name for name in fields if name not in values]
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
    """Refuse faults aimed at a rank the job will not have, and two faults of one kind on one rank."""
    seen: set[tuple[str, int]] = set()
    for fault in faults:
        if fault.rank >= world_size:
            last = world_size - 1
            raise FaultError(f"{fault.describe()}: the job has ranks 0..{last}, so rank {fault.rank} never runs")
        if (fault.kind, fault.rank) in seen:
            raise FaultError(f"two {fault.kind!r} faults for rank {fault.rank}; give one")
        seen.add((fault.kind, fault.rank))


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
