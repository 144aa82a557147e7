"""The persistent record of one node: its telemetry, events, rank statuses and stacks in an SQLite file.

The agent writes it (agent/record.py); ``megascope replay``, ``export`` and ``report`` read it. Both sides import
this one module, so the format has one definition: the import contracts keep the dashboard away from the agent,
and this package depends on nothing of ours but the generated messages.

Format (``SCHEMA_VERSION``): a ``meta`` table (schema version, run id, node) and one ``records`` table of
serialized proto messages, one row per message, with the columns queries need beside the bytes::

    seq        rowid, the order of writing
    wall_time  Unix seconds of the message (a step's end, a sample, an event, a status change, a stack dump)
    part       which message the payload is (:class:`Part`)
    rank, step, kind, severity   the message's own, where it has them (for a GPU sample, rank is the GPU index)
    detail     1 while the row is in full detail; 0 once downsampling kept it as a representative
    payload    the serialized message

Writing: WAL journal, one writer thread, rows committed in batches (a kill -9 loses at most the last batch and
never leaves a half-written one: SQLite's WAL is atomic per commit). After ``retention_seconds`` the bulk is
downsampled (every ``STEP_STRIDE``-th step of each rank, one host/GPU sample per ``SAMPLE_STRIDE_SECONDS``);
events, stacks and status changes are kept whole. Past ``max_bytes`` of live data, the oldest step reports and
samples go first, then the oldest of the rest.
"""

from __future__ import annotations

import enum
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

from google.protobuf.message import DecodeError, Message

from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

SCHEMA_VERSION = 1
STEP_STRIDE = 10
"""Past the retention window, one step report in this many (per rank) is kept."""
SAMPLE_STRIDE_SECONDS = 10.0
"""Past the retention window, one host sample (and one per GPU) in this many seconds is kept."""
DEFAULT_RETENTION_SECONDS = 3600.0
"""Full detail for the last hour (what the agent also keeps in memory); downsampled before."""
DEFAULT_MAX_BYTES = 2 << 30
COMMIT_SECONDS = 1.0
"""How often the writer commits: the most a kill -9 of the agent loses."""
MAINTENANCE_SECONDS = 60.0
STATUS_REFRESH_SECONDS = 30.0
"""Rank statuses are written when they change (state, step, pid, ...), and at least this often otherwise."""
_READ_CHUNK = 5000


class Part(enum.IntEnum):
    """What a row's payload is."""

    STEP = 1  # telemetry_pb2.StepReport
    HOST = 2  # telemetry_pb2.HostSample
    GPU = 3  # telemetry_pb2.GpuSample
    EVENT = 4  # telemetry_pb2.Event
    STATUS = 5  # telemetry_pb2.Telemetry holding only node_info and rank_statuses
    STACKS = 6  # agent_pb2.DumpStacksResponse


_MESSAGES: dict[Part, type[Message]] = {
    Part.STEP: telemetry_pb2.StepReport,
    Part.HOST: telemetry_pb2.HostSample,
    Part.GPU: telemetry_pb2.GpuSample,
    Part.EVENT: telemetry_pb2.Event,
    Part.STATUS: telemetry_pb2.Telemetry,
    Part.STACKS: agent_pb2.DumpStacksResponse,
}
BULK = (Part.STEP, Part.HOST, Part.GPU)
"""The parts downsampled and dropped first: detail, not incidents."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS records(
    seq INTEGER PRIMARY KEY,
    wall_time REAL NOT NULL,
    part INTEGER NOT NULL,
    rank INTEGER,
    step INTEGER,
    kind TEXT,
    severity INTEGER,
    detail INTEGER NOT NULL DEFAULT 1,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS records_time ON records(wall_time);
CREATE INDEX IF NOT EXISTS records_part_time ON records(part, wall_time);
"""


class RecordError(Exception):
    """A record that cannot be opened or written: the message names the file and what to do."""


@dataclass(frozen=True)
class Row:
    seq: int
    wall_time: float
    part: Part
    rank: int | None
    step: int | None
    kind: str | None
    severity: int | None
    payload: bytes
    parsed: Message | None = field(default=None, compare=False, repr=False)
    """The payload parsed (the reader parses every row once, to stop at damage)."""

    def message(self) -> Message:
        if self.parsed is not None:
            return self.parsed
        message = _MESSAGES[self.part]()
        message.ParseFromString(self.payload)
        return message


_Values = tuple[float, int, int | None, int | None, str | None, int | None, bytes]


def rows_of(telemetry: telemetry_pb2.Telemetry) -> list[_Values]:
    """The rows of a batch's step reports, samples and events (its statuses are the writer's to judge)."""
    rows: list[_Values] = []
    for r in telemetry.step_reports:
        rows.append((r.wall_time, Part.STEP, r.rank, r.step, None, None, r.SerializeToString()))
    for h in telemetry.host_samples:
        rows.append((h.wall_time, Part.HOST, None, None, None, None, h.SerializeToString()))
    for g in telemetry.gpu_samples:
        rows.append((g.wall_time, Part.GPU, g.index, None, None, None, g.SerializeToString()))
    for e in telemetry.events:
        rank = e.rank if e.HasField("rank") else None
        step = e.step if e.HasField("step") else None
        rows.append((e.wall_time, Part.EVENT, rank, step, e.kind, e.severity, e.SerializeToString()))
    return rows


def _status_key(telemetry: telemetry_pb2.Telemetry) -> bytes:
    """What of the statuses is worth a row when it changes: heartbeat times and counters move every second."""
    copy = telemetry_pb2.Telemetry()
    copy.node_info.CopyFrom(telemetry.node_info)
    for status in telemetry.rank_statuses:
        s = copy.rank_statuses.add()
        s.CopyFrom(status)
        for name in ("last_heartbeat_wall_time", "last_progress_wall_time", "cpu_seconds", "output_lines"):
            s.ClearField(name)
        s.ClearField("collectives_issued")
        s.ClearField("last_step")  # progress is in the step reports
    return copy.SerializeToString(deterministic=True)


def _connect(path: Path) -> sqlite3.Connection:
    # check_same_thread off: the writer's connection is made by its owner and then used by its thread only.
    connection = sqlite3.connect(str(path), timeout=10.0, check_same_thread=False, isolation_level=None)
    return connection


class RecordWriter:
    """Appends one node's telemetry to its record, from one background thread.

    ``add_batch`` and ``add_stacks`` only queue (callable from the agent's event loop: they never touch the disk).
    An existing record of the same run is appended to; one of another run is refused (:class:`RecordError`).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        node: str,
        run_id: str = "",
        retention_seconds: float = DEFAULT_RETENTION_SECONDS,
        max_bytes: int = DEFAULT_MAX_BYTES,
        commit_seconds: float = COMMIT_SECONDS,
        maintenance_seconds: float = MAINTENANCE_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.node, self.run_id = node, run_id
        self.retention_seconds, self.max_bytes = retention_seconds, max_bytes
        self.commit_seconds, self.maintenance_seconds = commit_seconds, maintenance_seconds
        self.clock = clock
        self.rows_written = 0
        self.error: str | None = None
        """Why the writer stopped writing (a full disk, a damaged file); None while it writes."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = _connect(self.path)
        try:
            self._open()
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise RecordError(
                f"{self.path}: not a megascope record, or damaged ({error}); move it aside to start a new record"
            ) from error
        self._queue: queue.SimpleQueue[tuple[str, object] | None] = queue.SimpleQueue()
        self._last_status: bytes | None = None
        self._last_status_time = 0.0
        self._thread = threading.Thread(target=self._run, name=f"record {node}", daemon=True)
        self._thread.start()

    def _open(self) -> None:
        db = self._db
        db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process being killed (not a power cut), for less than FULL costs.
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            db.executemany(
                "INSERT INTO meta(key, value) VALUES (?, ?)",
                [("schema_version", str(SCHEMA_VERSION)), ("run_id", self.run_id), ("node", self.node),
                 ("created", repr(self.clock()))],
            )  # fmt: skip
            return
        _check_version(self.path, meta)
        recorded = meta.get("run_id", "")
        if self.run_id and recorded and recorded != self.run_id:
            raise RecordError(
                f"{self.path} records run {recorded!r}, not this agent's run {self.run_id!r}: give this run its "
                "own --run-dir, or move the old record aside"
            )
        if self.run_id and not recorded:
            db.execute("UPDATE meta SET value = ? WHERE key = 'run_id'", (self.run_id,))

    # --- called from the agent's loop ------------------------------------------------------------------

    def add_batch(self, telemetry: telemetry_pb2.Telemetry) -> None:
        """Queue a Watch-style batch: its step reports, samples, events, and the statuses when they changed."""
        self._queue.put(("batch", telemetry))

    def add_stacks(self, stacks: agent_pb2.DumpStacksResponse, wall_time: float) -> None:
        self._queue.put(("stacks", (wall_time, stacks)))

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, commit, and stop the thread."""
        self._queue.put(None)
        self._thread.join(timeout)

    # --- the writer thread ------------------------------------------------------------------------------

    def _run(self) -> None:
        pending: list[_Values] = []
        next_commit = time.monotonic() + self.commit_seconds
        next_maintenance = time.monotonic() + self.maintenance_seconds
        closing = False
        while not closing:
            try:
                item = self._queue.get(timeout=max(0.0, next_commit - time.monotonic()))
            except queue.Empty:
                item = ("tick", None)
            if item is None:
                closing = True
            elif item[0] == "batch":
                pending.extend(self._rows_of_batch(item[1]))  # type: ignore[arg-type]
            elif item[0] == "stacks":
                wall_time, stacks = cast(tuple[float, agent_pb2.DumpStacksResponse], item[1])
                culprit = stacks.culprit if stacks.culprit >= 0 else None
                pending.append((wall_time, Part.STACKS, culprit, None, None, None, stacks.SerializeToString()))
            now = time.monotonic()
            if pending and (closing or now >= next_commit):
                self._write(pending)
                pending = []
            if now >= next_commit:
                next_commit = now + self.commit_seconds
            if now >= next_maintenance or closing:
                self._maintain()
                next_maintenance = now + self.maintenance_seconds
        self._db.close()

    def _rows_of_batch(self, telemetry: telemetry_pb2.Telemetry) -> list[_Values]:
        rows = rows_of(telemetry)
        if telemetry.HasField("node_info") or telemetry.rank_statuses:
            key = _status_key(telemetry)
            now = self.clock()
            if key != self._last_status or now - self._last_status_time >= STATUS_REFRESH_SECONDS:
                status = telemetry_pb2.Telemetry(rank_statuses=telemetry.rank_statuses)
                status.node_info.CopyFrom(telemetry.node_info)
                rows.append((now, Part.STATUS, None, None, None, None, status.SerializeToString()))
                self._last_status, self._last_status_time = key, now
        return rows

    def _write(self, rows: list[_Values]) -> None:
        if self.error is not None:
            return
        try:
            with self._db:  # one transaction per batch
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT INTO records(wall_time, part, rank, step, kind, severity, payload) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )
            self.rows_written += len(rows)
        except sqlite3.Error as error:
            # The agent must go on supervising when its record cannot be written (a full disk): say why, once.
            self.error = f"{self.path}: recording stopped: {error}"

    def _maintain(self) -> None:
        if self.error is not None:
            return
        try:
            downsample(self._db, self.clock() - self.retention_seconds)
            enforce_cap(self._db, self.max_bytes)
        except sqlite3.Error as error:
            self.error = f"{self.path}: recording stopped: {error}"


def downsample(db: sqlite3.Connection, before: float) -> int:
    """Thin the full-detail bulk older than ``before`` to its representatives; the rows removed."""
    removed = 0
    with db:
        db.execute("BEGIN")
        removed += db.execute(
            "DELETE FROM records WHERE part = ? AND detail = 1 AND wall_time < ? AND step % ? != 0",
            (Part.STEP, before, STEP_STRIDE),
        ).rowcount
        for part in (Part.HOST, Part.GPU):
            # The first sample of each stride (per GPU) stays.
            removed += db.execute(
                "DELETE FROM records WHERE part = ? AND detail = 1 AND wall_time < ? AND seq NOT IN ("
                "  SELECT MIN(seq) FROM records WHERE part = ? AND detail = 1 AND wall_time < ?"
                "  GROUP BY CAST(wall_time / ? AS INTEGER), rank)",
                (part, before, part, before, SAMPLE_STRIDE_SECONDS),
            ).rowcount
        db.execute(
            f"UPDATE records SET detail = 0 WHERE detail = 1 AND wall_time < ? AND part IN ({_BULK_SQL})", (before,)
        )
    return removed


_BULK_SQL = ",".join(str(int(p)) for p in BULK)


def live_bytes(db: sqlite3.Connection) -> int:
    """Bytes of the file in use (freed pages are reused before the file grows)."""
    page_size = db.execute("PRAGMA page_size").fetchone()[0]
    pages = db.execute("PRAGMA page_count").fetchone()[0] - db.execute("PRAGMA freelist_count").fetchone()[0]
    return int(pages * page_size)


def enforce_cap(db: sqlite3.Connection, max_bytes: int) -> int:
    """Drop the oldest rows until the live data fits ``max_bytes``: step reports and samples first; the rows removed."""
    removed = 0
    while live_bytes(db) > max_bytes:
        count = db.execute("SELECT COUNT(*) FROM records").fetchone()[0]
        if count == 0:
            break
        chunk = max(1, count // 10)
        bulk = db.execute(f"SELECT COUNT(*) FROM records WHERE part IN ({_BULK_SQL})").fetchone()[0]
        where = f"WHERE part IN ({_BULK_SQL})" if bulk else ""
        with db:
            db.execute("BEGIN")
            removed += db.execute(
                f"DELETE FROM records WHERE seq IN (SELECT seq FROM records {where} ORDER BY wall_time LIMIT ?)",
                (chunk,),
            ).rowcount
    return removed


def _check_version(path: Path, meta: dict[str, str]) -> None:
    version = meta.get("schema_version")
    if version != str(SCHEMA_VERSION):
        raise RecordError(
            f"{path}: record format version {version}, this megascope reads version {SCHEMA_VERSION}: "
            "open it with the megascope that wrote it"
        )


class RecordReader:
    """One node's record, read-only. Raises :class:`RecordError` with a message that says what is wrong.

    A record damaged in the middle (a disk error, a file cut short) reads up to the damage: :meth:`rows` stops
    there and :attr:`damage` says where and why.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.damage: str | None = None
        if not self.path.is_file():
            raise RecordError(f"{self.path}: no such record")
        if self.path.stat().st_size == 0:
            raise RecordError(f"{self.path}: empty file (the agent was stopped before its first commit)")
        # Read-write, never written: opening recovers a WAL a killed writer left behind (read-only could not).
        self._db = _connect(self.path)
        try:
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as error:
            self._db.close()
            raise RecordError(f"{self.path}: not a megascope record, or damaged beyond reading ({error})") from error
        if not meta:
            raise RecordError(f"{self.path}: not a megascope record (no meta table rows)")
        _check_version(self.path, meta)
        self.run_id = meta.get("run_id", "")
        self.node = meta.get("node", self.path.stem)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def rows(
        self, parts: Iterable[Part] | None = None, since: float | None = None, until: float | None = None
    ) -> Iterator[Row]:
        """Every row in the order written (about time order), of ``parts`` (all when None), with ``since <= wall_time
        < until`` when given, up to any damage."""
        where = ""
        if parts is not None:
            where = f"AND part IN ({','.join(str(int(p)) for p in parts)})"
        bounds: list[float] = []
        if since is not None:
            where += " AND wall_time >= ?"
            bounds.append(since)
        if until is not None:
            where += " AND wall_time < ?"
            bounds.append(until)
        last, size = 0, _READ_CHUNK
        while True:
            try:
                chunk = self._db.execute(
                    "SELECT seq, wall_time, part, rank, step, kind, severity, payload FROM records "
                    f"WHERE seq > ? {where} ORDER BY seq LIMIT ?",
                    (last, *bounds, size),
                ).fetchall()
            except sqlite3.DatabaseError as error:
                if size > 1:  # the damage is somewhere in this chunk: close in on it, to read every row before it
                    size //= 2
                    continue
                self.damage = f"{self.path}: damaged after row {last}: {error}; read up to there"
                return
            if not chunk:
                return
            for values in chunk:
                try:
                    part = Part(values[2])
                    message = _MESSAGES[part]()
                    message.ParseFromString(values[7])  # a payload that does not parse is damage too
                    rank, step, kind, severity, payload = values[3:]
                    row = Row(values[0], values[1], part, rank, step, kind, severity, payload, message)
                except (ValueError, DecodeError) as error:
                    self.damage = f"{self.path}: damaged at row {values[0]}: {error}; read up to there"
                    return
                yield row
            last = chunk[-1][0]

    def messages(self, part: Part) -> Iterator[tuple[Row, Message]]:
        for row in self.rows([part]):
            yield row, row.message()

    def span(self) -> tuple[float, float] | None:
        """The first and last wall time recorded; None when empty."""
        try:
            first, last = self._db.execute("SELECT MIN(wall_time), MAX(wall_time) FROM records").fetchone()
        except sqlite3.DatabaseError:
            return None
        return None if first is None else (first, last)


def open_records(paths: Iterable[Path]) -> list[RecordReader]:
    """Readers for every path, all of one run: :class:`RecordError` names the odd one out (the others closed)."""
    readers: list[RecordReader] = []
    try:
        for path in paths:
            readers.append(RecordReader(path))
        runs = {r.run_id for r in readers if r.run_id}
        if len(runs) > 1:
            listing = "; ".join(f"{r.path}: run {r.run_id!r}" for r in readers)
            raise RecordError(f"these records are of different runs ({listing}): replay one run at a time")
    except RecordError:
        for reader in readers:
            reader.close()
        raise
    return readers
