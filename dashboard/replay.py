"""A replay source: recorded runs fed to the same cluster model the live dashboard draws, up to a time cursor.

Every node's record (megascope.protos.recording) is read once and merged into one time-ordered list. Moving the
cursor forward ingests the next messages, node by node, as the agents' batches would have brought them; the
model's clock is the cursor, so ages, STALLED and ETAs read as they did at that moment.

The straggler rules judge every step as it is ingested, so rebuilding an hour's model costs seconds, not
milliseconds. Instead, a background thread walks the record once after it opens and keeps a keyframe (the model,
pickled; its containers are bounded) every ``KEYFRAME_SECONDS``; a seek restores the newest keyframe at or before
its target (or goes on from the cursor, when that is nearer) and ingests at most one keyframe interval of messages.

Pure Python (no Textual): tests, ``megascope report`` and the bench drive it directly.
"""

from __future__ import annotations

import bisect
import io
import pickle
import re
import threading
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from google.protobuf.message import Message

from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.model.diagnosis import AgentStacks, JobStacks, job_stacks
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2
from megascope.protos.recording import Part, RecordError, open_records

KEYFRAME_SECONDS = 60.0
MAX_KEYFRAMES = 64
_BATCH_SECONDS = 0.5
INCIDENT_KINDS = frozenset({"crash", "hang", "stalled", "job_failed", "node_left", "node_evicted", "straggler"})
"""The events ``next`` / ``previous incident`` stop at."""


class ReplayError(Exception):
    """Nothing to replay: the message says what was given and what is missing."""


@dataclass(frozen=True)
class Item:
    wall_time: float
    address: str
    part: Part
    message: Message


def record_paths(run_dirs: Sequence[str | Path]) -> list[Path]:
    """Every node's record in the run directories; :class:`ReplayError` names a directory without one."""
    paths: list[Path] = []
    for run_dir in run_dirs:
        if not Path(run_dir).is_dir():
            raise ReplayError(f"{run_dir}: no such directory (give the --run-dir of a recorded run)")
        found = run_paths.record_files(run_dir)
        if not found:
            raise ReplayError(
                f"{run_dir}: no record in {run_paths.record_dir(run_dir)} (agents record from this version on; "
                "was this directory the agents' --run-dir?)"
            )
        paths.extend(found)
    return paths


def load_items(run_dirs: Sequence[str | Path]) -> tuple[list[Item], list[str], str]:
    """Every recorded message of the runs in time order, the damage warnings, and the run id."""
    try:
        readers = open_records(record_paths(run_dirs))
    except RecordError as error:
        raise ReplayError(str(error)) from error
    items: list[Item] = []
    warnings: list[str] = []
    run_ids = {r.run_id for r in readers if r.run_id}
    for reader in readers:
        with reader:
            address = f"record:{reader.node}"
            for row in reader.rows():
                items.append(Item(row.wall_time, address, row.part, row.message()))
            if reader.damage is not None:
                warnings.append(reader.damage)
    items.sort(key=lambda item: item.wall_time)  # stable: a node's own order is kept among equal times
    if not items:
        raise ReplayError(f"the record of {', '.join(str(d) for d in run_dirs)} holds nothing yet")
    return items, warnings, ",".join(sorted(run_ids))


class _Cursor:
    """A model's clock: the time its pass has reached."""

    def __init__(self, time: float) -> None:
        self.time = time

    def __call__(self) -> float:
        return self.time


class _Pass:
    """A model fed the items in order up to a time: the replay's own, and the keyframe indexer's."""

    def __init__(self, items: list[Item], times: list[float], addresses: list[str], start: float) -> None:
        self.items, self.times = items, times
        self.clock = _Cursor(start)
        self.model = ClusterModel(clock=self.clock, log_connections=False)
        for address in addresses:
            self.model.set_connected(address)
        self.next = 0
        """The index of the first item not yet ingested."""

    def restore(self, keyframe: _Keyframe, functions: dict[int, object]) -> None:
        """Become the keyframe's model (a copy whose clock is this pass's)."""
        self.model = _KeyframeUnpickler(io.BytesIO(keyframe.data), self.clock, functions).load()
        self.next = keyframe.next
        self.clock.time = keyframe.time

    def snapshot(self, functions: dict[int, object]) -> _Keyframe:
        buffer = io.BytesIO()
        _KeyframePickler(buffer, self.clock, functions).dump(self.model)
        return _Keyframe(self.clock.time, self.next, buffer.getvalue())

    def ingest_until(self, until: float) -> None:
        end = bisect.bisect_right(self.times, until)
        if end > self.next:
            self._ingest(self.next, end)
            self.next = end
        self.clock.time = until
        self.model.version += 1

    def _ingest(self, begin: int, end: int) -> None:
        """Items ``[begin, end)`` into the model: consecutive items of one node within ``_BATCH_SECONDS`` as one
        batch, ingested with the clock at its newest item's time (so "last stepped" ages are as they were)."""
        batch: telemetry_pb2.Telemetry | None = None
        address, first = "", 0.0
        for item in self.items[begin:end]:
            if batch is not None and (item.address != address or item.wall_time - first > _BATCH_SECONDS):
                self.model.ingest(address, batch)
                batch = None
            if batch is None:
                batch, address, first = telemetry_pb2.Telemetry(), item.address, item.wall_time
            self.clock.time = item.wall_time
            message = item.message
            if item.part == Part.STEP:
                batch.step_reports.append(message)  # type: ignore[arg-type]
            elif item.part == Part.HOST:
                batch.host_samples.append(message)  # type: ignore[arg-type]
            elif item.part == Part.GPU:
                batch.gpu_samples.append(message)  # type: ignore[arg-type]
            elif item.part == Part.EVENT:
                batch.events.append(message)  # type: ignore[arg-type]
            elif item.part == Part.STATUS:
                if batch.step_reports or batch.events:
                    self.model.ingest(address, batch)  # the status is newer than what came before it
                    batch = telemetry_pb2.Telemetry()
                batch.MergeFrom(message)
        if batch is not None:
            self.model.ingest(address, batch)


@dataclass(frozen=True)
class _Keyframe:
    time: float
    next: int
    data: bytes
    """The model, pickled: a fifth of the memory of a live copy, and as fast to restore."""


class _KeyframePickler(pickle.Pickler):
    """Pickles a model; its clock and its (stateless) lambdas by reference, as pickle cannot write functions."""

    def __init__(self, file: io.BytesIO, clock: _Cursor, functions: dict[int, object]) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.clock, self.functions = clock, functions

    def persistent_id(self, obj: object) -> object:
        if obj is self.clock:
            return "clock"
        if isinstance(obj, types.FunctionType):
            self.functions[id(obj)] = obj  # kept alive here, so the id is never reused
            return id(obj)
        return None


class _KeyframeUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, clock: _Cursor, functions: dict[int, object]) -> None:
        super().__init__(file)
        self.clock, self.functions = clock, functions

    def persistent_load(self, pid: object) -> object:
        return self.clock if pid == "clock" else self.functions[pid]  # type: ignore[index]


class Replay:
    """Recorded runs behind a cursor. ``model`` is the cluster model as it was at ``cursor``.

    Opening draws the first frame at once; a background thread then walks the record once and keeps a keyframe
    every ``keyframe_seconds`` (at most ``MAX_KEYFRAMES``: a longer record spaces them further apart). A seek starts
    from the nearest keyframe (or the cursor, when that is nearer) at or before its target.
    """

    def __init__(
        self, items: list[Item], warnings: Iterable[str] = (), run_id: str = "", *, index: bool = True
    ) -> None:
        if not items:
            raise ReplayError("nothing recorded to replay")
        self.items = items
        self.times = [item.wall_time for item in items]
        self.warnings = list(warnings)
        self.run_id = run_id
        self.start, self.end = self.times[0], self.times[-1]
        self.addresses = sorted({item.address for item in items})
        self.keyframe_seconds = max(KEYFRAME_SECONDS, (self.end - self.start) / MAX_KEYFRAMES)
        self._keyframes: list[_Keyframe] = []
        self._functions: dict[int, object] = {}
        """The models' lambdas, by id: the keyframes refer to them (see _KeyframePickler)."""
        """In time order; appended by the indexer thread (a list append is atomic), read by seeks."""
        self._pass = self._new_pass()
        self.incidents = [
            item
            for item in items
            if item.part == Part.EVENT and item.message.kind in INCIDENT_KINDS  # type: ignore[attr-defined]
        ]
        self._stacks = [item for item in items if item.part == Part.STACKS]
        self._stop = threading.Event()
        self._indexer: threading.Thread | None = None
        self._pass.ingest_until(self.start)
        if index:
            self._indexer = threading.Thread(target=self._index, name="replay keyframes", daemon=True)
            self._indexer.start()

    @classmethod
    def open(cls, run_dirs: Sequence[str | Path], *, index: bool = True) -> Replay:
        items, warnings, run_id = load_items(run_dirs)
        return cls(items, warnings, run_id, index=index)

    def _new_pass(self) -> _Pass:
        return _Pass(self.items, self.times, self.addresses, self.start)

    @property
    def model(self) -> ClusterModel:
        return self._pass.model

    @property
    def cursor(self) -> float:
        return self._pass.clock.time

    def close(self) -> None:
        self._stop.set()

    # --- keyframes ----------------------------------------------------------------------------------------

    def _index(self) -> None:
        indexer = self._new_pass()
        time = self.start
        while time < self.end and not self._stop.is_set():
            time = min(self.end, time + self.keyframe_seconds)
            indexer.ingest_until(time)
            self._keyframes.append(indexer.snapshot(self._functions))

    def wait_indexed(self, timeout: float | None = None) -> bool:
        """Wait for every keyframe (tests and the bench); whether they are all there."""
        if self._indexer is not None:
            self._indexer.join(timeout)
        return self._indexer is None or not self._indexer.is_alive()

    # --- moving the cursor --------------------------------------------------------------------------------

    def seek(self, target: float) -> None:
        """Put the cursor at ``target`` (clamped to the record) and the model as it was then."""
        target = min(max(target, self.start), self.end)
        keyframes = list(self._keyframes)
        index = bisect.bisect_right([k.time for k in keyframes], target) - 1
        keyframe = keyframes[index] if index >= 0 else None
        here = self.cursor if self.cursor <= target else None
        if keyframe is not None and (here is None or keyframe.time > here):
            self._pass.restore(keyframe, self._functions)
        elif here is None:
            self._pass = self._new_pass()
        self._pass.ingest_until(target)

    def time_of_step(self, step: int) -> float | None:
        """When the job first completed ``step`` (any rank); None when the record never reaches it."""
        for item in self.items:
            if item.part == Part.STEP and item.message.step >= step:  # type: ignore[attr-defined]
                return item.wall_time
        return None

    def next_incident(self) -> Item | None:
        """The first incident after the cursor (a small margin: the one the cursor stands on is behind it)."""
        for item in self.incidents:
            if item.wall_time > self.cursor + 1e-6:
                return item
        return None

    def previous_incident(self) -> Item | None:
        for item in reversed(self.incidents):
            if item.wall_time < self.cursor - 1e-6:
                return item
        return None

    def first_incident(self, kind: str) -> Item | None:
        return next((i for i in self.incidents if i.message.kind == kind), None)  # type: ignore[attr-defined]

    # --- what was recorded at the cursor ------------------------------------------------------------------

    def stacks_at(self) -> JobStacks | None:
        """The stacks each node collected last at or before the cursor, judged as the live dashboard judges them;
        None when no node had collected any yet."""
        newest: dict[str, Item] = {}
        for item in self._stacks:
            if item.wall_time > self.cursor:
                break
            newest[item.address] = item
        if not newest:
            return None
        nodes = {row.agent: row.node for row in self.model.node_rows()}
        agents = [
            AgentStacks(address, nodes.get(address, address), item.message)  # type: ignore[arg-type]
            for address, item in sorted(newest.items())
        ]
        asked = max(item.wall_time for item in newest.values())
        stalled = any(
            isinstance(item.message, agent_pb2.DumpStacksResponse) and item.message.culprit >= 0
            for item in newest.values()
        )
        return job_stacks(agents, asked, stalled=stalled or self.model.stalled())


def resolve_at(replay: Replay, text: str) -> float | str:
    """The wall time ``--at`` names: a time, an offset, a step, or the first incident of a kind; or why none."""
    kind = text.strip().lower()
    if kind in INCIDENT_KINDS or kind in ("restart", "recovered"):  # a recovery in place: "recovered"
        found = next((i for i in replay.items if i.part == Part.EVENT and i.message.kind == kind), None)  # type: ignore[attr-defined]
        return found.wall_time if found is not None else f"the record holds no {kind!r} event"
    target = parse_target(text, replay.start)
    if isinstance(target, str):
        return target
    if target.step is not None:
        moment = replay.time_of_step(target.step)
        return moment if moment is not None else f"the record never reaches step {target.step:,}"
    assert target.wall_time is not None
    return target.wall_time


HINT = "HH:MM[:SS] (the clock time), +SECONDS or +MM:SS (from the start), or step N; enter: go, esc: cancel"


class SeekTarget:
    """What the user asked to go to: a wall time, or a step (the replay finds when it was done)."""

    def __init__(self, wall_time: float | None = None, step: int | None = None) -> None:
        self.wall_time, self.step = wall_time, step


def parse_target(text: str, start: float) -> SeekTarget | str:
    """The target ``text`` names in a record that starts at ``start``, or why it names none."""
    text = text.strip().lower()
    if match := re.fullmatch(r"step\s*(\d+)", text):
        return SeekTarget(step=int(match.group(1)))
    if match := re.fullmatch(r"\+(\d+)(?::(\d{1,2}))?", text):
        minutes_or_seconds, seconds = match.groups()
        offset = int(minutes_or_seconds) * 60 + int(seconds) if seconds is not None else int(minutes_or_seconds)
        return SeekTarget(wall_time=start + offset)
    if match := re.fullmatch(r"(\d{1,2}):(\d{2})(?::(\d{2}))?", text):
        hour, minute, second = int(match.group(1)), int(match.group(2)), int(match.group(3) or 0)
        if hour > 23 or minute > 59 or second > 59:
            return f"{text!r} is not a time of day"
        day = datetime.fromtimestamp(start)
        moment = day.replace(hour=hour, minute=minute, second=second, microsecond=0).timestamp()
        if moment < start - 1:  # a time before the start is on the next day (a run past midnight)
            moment += 86400
        return SeekTarget(wall_time=moment)
    return f"{text!r}: expected {HINT.split(';')[0]}"
