"""The record's format (megascope.protos.recording) on real SQLite files: writing, reading back, appending,
downsampling, the size cap, and damaged or foreign files."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from megascope.protos import recording
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2
from megascope.protos.recording import Part, RecordError, RecordReader, RecordWriter

T0 = float(int(time.time()) // 10 * 10 - 1200)
"""Recent times (20 minutes ago): the writer downsamples what is older than its retention window (an hour)."""


def _batch(step: int, wall_time: float, ranks: int = 2) -> telemetry_pb2.Telemetry:
    batch = telemetry_pb2.Telemetry(
        step_reports=[
            telemetry_pb2.StepReport(node="node0", rank=r, step=step, loss=1.0 / (step + 1), wall_time=wall_time)
            for r in range(ranks)
        ],
        host_samples=[telemetry_pb2.HostSample(node="node0", wall_time=wall_time, cpu_percent=50.0)],
        rank_statuses=[telemetry_pb2.RankStatus(rank=r, state=telemetry_pb2.RANK_STATE_RUNNING) for r in range(ranks)],
    )
    batch.node_info.node = "node0"
    batch.node_info.run_id = "run-a"
    return batch


def _write(path: Path, batches: list[telemetry_pb2.Telemetry], **options: object) -> None:
    writer = RecordWriter(path, node="node0", run_id="run-a", **options)  # type: ignore[arg-type]
    for batch in batches:
        writer.add_batch(batch)
    writer.close()
    assert writer.error is None


def test_a_written_record_reads_back_every_message(tmp_path: Path) -> None:
    path = tmp_path / "node0.sqlite"
    _write(path, [_batch(s, T0 + s) for s in range(5)])
    with RecordReader(path) as reader:
        assert (reader.run_id, reader.node) == ("run-a", "node0")
        steps = [m for _, m in reader.messages(Part.STEP)]
        assert [(m.rank, m.step) for m in steps] == [(r, s) for s in range(5) for r in range(2)]  # type: ignore[attr-defined]
        assert len(list(reader.messages(Part.HOST))) == 5
        assert reader.damage is None


def test_unchanged_rank_statuses_are_written_once(tmp_path: Path) -> None:
    path = tmp_path / "node0.sqlite"
    _write(path, [_batch(s, T0 + s) for s in range(20)])
    with RecordReader(path) as reader:
        assert len(list(reader.rows([Part.STATUS]))) == 1


def test_stacks_are_recorded_with_their_culprit(tmp_path: Path) -> None:
    path = tmp_path / "node0.sqlite"
    writer = RecordWriter(path, node="node0", run_id="run-a")
    stacks = agent_pb2.DumpStacksResponse(culprit=1, reason="rank 1 lags", ranks=[agent_pb2.RankStacks(rank=1)])
    writer.add_stacks(stacks, T0 + 0.5)
    writer.close()
    with RecordReader(path) as reader:
        [(row, message)] = list(reader.messages(Part.STACKS))
    assert (row.wall_time, row.rank, message) == (T0 + 0.5, 1, stacks)


def test_a_second_writer_on_the_same_run_appends(tmp_path: Path) -> None:
    path = tmp_path / "node0.sqlite"
    _write(path, [_batch(0, T0)])
    _write(path, [_batch(1, T0 + 1)])
    with RecordReader(path) as reader:
        assert [m.step for _, m in reader.messages(Part.STEP)] == [0, 0, 1, 1]  # type: ignore[attr-defined]


def test_a_record_of_another_run_is_refused_by_name(tmp_path: Path) -> None:
    path = tmp_path / "node0.sqlite"
    _write(path, [_batch(0, T0)])
    with pytest.raises(RecordError, match="run 'run-a', not this agent's run 'run-b'"):
        RecordWriter(path, node="node0", run_id="run-b")


def test_records_of_different_runs_are_not_merged(tmp_path: Path) -> None:
    _write(tmp_path / "a.sqlite", [_batch(0, T0)])
    writer = RecordWriter(tmp_path / "b.sqlite", node="node1", run_id="run-b")
    writer.close()
    with pytest.raises(RecordError, match="different runs"):
        recording.open_records([tmp_path / "a.sqlite", tmp_path / "b.sqlite"])


def test_downsampling_keeps_every_tenth_step_and_one_sample_per_stride(tmp_path: Path) -> None:
    path = tmp_path / "node0.sqlite"
    _write(path, [_batch(s, T0 + s) for s in range(100)])
    db = sqlite3.connect(path, isolation_level=None)
    recording.downsample(db, before=T0 + 50)
    db.close()
    with RecordReader(path) as reader:
        steps = sorted({m.step for _, m in reader.messages(Part.STEP)})  # type: ignore[attr-defined]
        hosts = [m.wall_time for _, m in reader.messages(Part.HOST)]  # type: ignore[attr-defined]
    assert steps == [0, 10, 20, 30, 40, *range(50, 100)]
    assert hosts == [T0 + s for s in (0, 10, 20, 30, 40)] + [T0 + s for s in range(50, 100)]


def test_the_size_cap_drops_the_oldest_step_reports_before_any_event(tmp_path: Path) -> None:
    path = tmp_path / "node0.sqlite"
    batches = [_batch(s, T0 + s, ranks=8) for s in range(2000)]
    batches[0].events.append(telemetry_pb2.Event(wall_time=T0, kind="crash", text="rank 1 died"))
    _write(path, batches)
    db = sqlite3.connect(path, isolation_level=None)
    before = recording.live_bytes(db)
    recording.enforce_cap(db, before // 2)
    assert recording.live_bytes(db) <= before // 2
    db.close()
    with RecordReader(path) as reader:
        steps = [m.step for _, m in reader.messages(Part.STEP)]  # type: ignore[attr-defined]
        kinds = [m.kind for _, m in reader.messages(Part.EVENT)]  # type: ignore[attr-defined]
    assert kinds == ["crash"]
    assert steps[-1] == 1999 and min(steps) > 0


def test_a_missing_empty_or_foreign_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(RecordError, match="no such record"):
        RecordReader(tmp_path / "none.sqlite")
    (tmp_path / "empty.sqlite").write_bytes(b"")
    with pytest.raises(RecordError, match="empty file"):
        RecordReader(tmp_path / "empty.sqlite")
    (tmp_path / "text.sqlite").write_text("hello, not a database\n" * 200)
    with pytest.raises(RecordError, match="not a megascope record"):
        RecordReader(tmp_path / "text.sqlite")


def test_a_record_damaged_in_the_middle_reads_up_to_the_damage(tmp_path: Path) -> None:
    path = tmp_path / "node0.sqlite"
    _write(path, [_batch(s, T0 + s) for s in range(3000)])
    data = bytearray(path.read_bytes())
    # Zero a run of pages a third into the file: rows' pages (the first pages hold the schema and the meta).
    page = 4096
    start, end = len(data) * 30 // 100 // page * page, len(data) * 35 // 100 // page * page
    data[start:end] = bytes(end - start)
    path.write_bytes(bytes(data))
    with RecordReader(path) as reader:
        steps = [m.step for _, m in reader.messages(Part.STEP)]  # type: ignore[attr-defined]
        assert reader.damage is not None and "damaged" in reader.damage
    assert 0 < len(steps) < 6000
    assert steps[:4] == [0, 0, 1, 1]
