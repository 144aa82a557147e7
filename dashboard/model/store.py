"""What the cluster model keeps, and the bounded containers it keeps it in.

Everything the dashboard holds is bounded (a dashboard watches a job for days): a step history per rank, host
and GPU samples per node, and an event log, each capped by the sizes below. Tests shrink them through this
module (``monkeypatch.setattr(store, "STEP_HISTORY", 50)``), so they are read when a container is made, never
copied at import.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from google.protobuf.message import Message

from megascope.protos.megascope.v1 import telemetry_pb2

K = TypeVar("K", int, float)
V = TypeVar("V")
M = TypeVar("M", bound=Message)

STEP_HISTORY = 600
"""Step reports kept per rank (the loss plot and the throughput median read these)."""
HOST_HISTORY = 3600
"""Host samples kept per node, and samples per GPU: one hour at the agents' 1 Hz."""
EVENT_HISTORY = 1000
"""Events kept in the merged log."""


class Bounded(Generic[K, V]):
    """Values ordered by a numeric key, keeping only the ``capacity`` largest keys.

    Putting an existing key replaces its value (so a replayed batch changes nothing); a key older than
    everything kept in a full series is dropped rather than evicting newer data.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._keys: list[K] = []
        self._values: dict[K, V] = {}

    def put(self, key: K, value: V) -> bool:
        """Store ``value`` under ``key``; False when it was too old to keep."""
        if key in self._values:
            self._values[key] = value
            return True
        if len(self._keys) >= self.capacity and key < self._keys[0]:
            return False
        bisect.insort(self._keys, key)
        self._values[key] = value
        while len(self._keys) > self.capacity:
            del self._values[self._keys.pop(0)]
        return True

    def drop_from(self, key: K) -> None:
        """Forget every entry at or after ``key``."""
        cut = bisect.bisect_left(self._keys, key)
        for old in self._keys[cut:]:
            del self._values[old]
        del self._keys[cut:]

    def get(self, key: K) -> V | None:
        return self._values.get(key)

    def keys(self) -> list[K]:
        return list(self._keys)

    def values(self) -> list[V]:
        return [self._values[k] for k in self._keys]

    def items(self) -> Iterator[tuple[K, V]]:
        return ((k, self._values[k]) for k in self._keys)

    def last(self) -> V | None:
        return self._values[self._keys[-1]] if self._keys else None

    def __contains__(self, key: object) -> bool:
        return key in self._values

    def __len__(self) -> int:
        return len(self._keys)


def copy_message(message: M) -> M:
    """A copy of a proto message: keeping a sub-message of a batch would keep its whole batch alive."""
    copied = type(message)()
    copied.CopyFrom(message)
    return copied


@dataclass(order=True)
class StoredEvent:
    sort_key: tuple[float, int]
    """(wall time, arrival id): the log is ordered by when things happened, ties by arrival."""
    id: int = field(compare=False)
    event: telemetry_pb2.Event = field(compare=False)
    dedup_key: tuple[object, ...] = field(compare=False)


def dedup_key(event: telemetry_pb2.Event) -> tuple[object, ...]:
    """What makes an event the same event again (a reconnect replays the agent's back-fill)."""
    rank = event.rank if event.HasField("rank") else None
    return (event.wall_time, event.node, event.kind, event.severity, rank, event.text)


class EventLog:
    """Events in time order (ties by arrival), each kept once, at most ``capacity()`` of them, the newest.

    ``capacity`` is a callable so that a bound changed after the log was made (tests) takes effect.
    """

    def __init__(self, capacity: Callable[[], int]) -> None:
        self._capacity = capacity
        self._stored: list[StoredEvent] = []
        self._keys: set[tuple[object, ...]] = set()

    def add(self, stored: StoredEvent) -> bool:
        """Keep ``stored`` in its place; False when the log already has it (a replay)."""
        if stored.dedup_key in self._keys:
            return False
        bisect.insort(self._stored, stored)
        self._keys.add(stored.dedup_key)
        while len(self._stored) > self._capacity():
            self._keys.discard(self._stored.pop(0).dedup_key)
        return True

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[StoredEvent]:
        return iter(self._stored)

    def __reversed__(self) -> Iterator[StoredEvent]:
        return reversed(self._stored)

    def __len__(self) -> int:
        return len(self._stored)

    def newest(self, limit: int | None = None) -> list[StoredEvent]:
        """Oldest first; only the newest ``limit`` when given."""
        return list(self._stored) if limit is None else self._stored[-limit:]


@dataclass
class NodeRecord:
    """A node, known by the address of its agent (its name only arrives with node info)."""

    agent: str
    info: telemetry_pb2.NodeInfo | None = None
    host: Bounded[float, telemetry_pb2.HostSample] = field(default_factory=lambda: Bounded(HOST_HISTORY))
    gpus: dict[int, Bounded[float, telemetry_pb2.GpuSample]] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.info.node if self.info is not None and self.info.node else self.agent

    def add_gpu_sample(self, sample: telemetry_pb2.GpuSample) -> None:
        self.gpus.setdefault(sample.index, Bounded(HOST_HISTORY)).put(sample.wall_time, sample)


@dataclass
class RankRecord:
    """A rank: its reports and its agent's view of its process."""

    rank: int
    agent: str
    """Address of the agent that last spoke about this rank."""
    node: str
    latest: telemetry_pb2.StepReport | None = None
    history: Bounded[int, telemetry_pb2.StepReport] = field(default_factory=lambda: Bounded(STEP_HISTORY))
    status: telemetry_pb2.RankStatus | None = None
    heard: float = 0.0
    """Model clock when this rank was announced or last sent a report."""
    stepped: float = 0.0
    """Model clock when this rank last reported a step beyond its latest (a rank that stops stepping stalls)."""
    attempt: int = 0
    """The torch elastic restart count of what ``latest`` and ``history`` hold: a report of an older attempt is
    late and dropped; a newer attempt (seen in a report or in the agent's rank status) resets the row."""
    resume_pending: bool = False
    """The new attempt was seen in a rank status, before its first step: that step tells where it resumed."""
