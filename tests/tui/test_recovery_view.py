"""A recovery in place in the TUI: the header shows the run's live ETTR beside the restart count, the fault line
says "recovered in place", and ``enter`` on the ``recovered`` event shows its breakdown. Driven over real gRPC by an
in-test agent (support.fake_agent.FakeAgent) that serves synthetic steps and events; and from a record through
``megascope replay``, which reads it into the same model.

The job: one node of 4 ranks, a step every 0.5 s; rank 2 is SIGKILLed after step 20, replaced in place, and the
job goes on 2 s later with step 21 (nothing redone). ETTR = 30 steps x 0.5 s / (10 s + 2 s + 5 s) = 88.2%.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.fake_agent import FakeAgent, serve
from support.tui import SIZE, header_text, rendered_words, until

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.replay import Replay, resolve_at
from megascope.dashboard.screens.event_detail import EventDetailScreen
from megascope.dashboard.screens.replay_seek import SeekScreen
from megascope.dashboard.widgets.bars import FaultBar
from megascope.dashboard.widgets.tables import EventsTable
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos.events import WARNING, make_event
from megascope.protos.megascope.v1 import telemetry_pb2
from megascope.protos.recording import RecordWriter

RANKS = [0, 1, 2, 3]
STEP_SECONDS = 0.5
FAULT_STEP, LAST_STEP, DOWN_SECONDS = 20, 30, 2.0
EXPECTED_ETTR = "88.2%"
_RESTART = telemetry_pb2.RestartDetail


def _end_of(step: int, start: float) -> float:
    """When ``step`` was done: back to back from ``start``, with the recovery's gap after the fault step."""
    return start + step * STEP_SECONDS + (DOWN_SECONDS if step > FAULT_STEP else 0.0)


def _steps(first: int, last: int, start: float) -> list[telemetry_pb2.StepReport]:
    return [
        telemetry_pb2.StepReport(
            node="node0",
            rank=rank,
            world_size=len(RANKS),
            step=step,
            loss=3.0 - step / 100,
            tokens=1024,
            step_seconds=STEP_SECONDS,
            wall_time=_end_of(step, start),
        )  # fmt: skip
        for step in range(first, last + 1)
        for rank in RANKS
    ]


def _fault_events(start: float) -> list[telemetry_pb2.Event]:
    """The agent's crash, rank 0's ``recovered`` (the breakdown) and the agent's closing in-place ``restart``."""
    fault = _end_of(FAULT_STEP, start) + 0.1
    crash = make_event(
        "rank 2 (pid 5002) died of SIGKILL after step 20; replacing rank 2",
        telemetry_pb2.CrashDetail(signal="SIGKILL", detect_seconds=0.05, last_step=FAULT_STEP),
        severity=WARNING, node="node0", rank=2, step=FAULT_STEP, wall_time=fault + 0.05,
    )  # fmt: skip
    recovered = make_event(
        "rank 2 replaced in place: generation 1 from step 20 (state of rank 0), 81 ms after the failure",
        telemetry_pb2.RecoveryDetail(
            replaced_ranks=[2], generation=1, step=FAULT_STEP, donor_rank=0, steps_redone=0,
            failed_wall_time=fault + 0.03, reform_seconds=0.066, transfer_seconds=0.012,
            state_bytes=23 * 512 * 1024, replacement_ready_seconds=0.021, total_seconds=0.081,
        ),
        severity=WARNING, node="node0", rank=0, step=FAULT_STEP, wall_time=fault + 0.12,
    )  # fmt: skip
    restart = make_event(
        "job recovered in place after the crash: went on from step 20, first step done 1.9s after the fault, "
        "0 steps redone",
        _RESTART(phase=_RESTART.PHASE_DONE, cause=_RESTART.CAUSE_CRASH, mttr_seconds=1.9, steps_lost=0,
                 resumed_step=FAULT_STEP, in_place=True),
        severity=WARNING, node="node0", rank=0, step=FAULT_STEP, wall_time=_end_of(FAULT_STEP + 1, start),
    )  # fmt: skip
    return [crash, recovered, restart]


def _node_info(start: float) -> telemetry_pb2.NodeInfo:
    return telemetry_pb2.NodeInfo(
        node="node0", ranks=RANKS, world_size=len(RANKS), start_wall_time=start, total_steps=100, run_id="rec",
    )  # fmt: skip


def _running() -> list[telemetry_pb2.RankStatus]:
    return [telemetry_pb2.RankStatus(rank=r, pid=5000 + r, state=telemetry_pb2.RANK_STATE_RUNNING) for r in RANKS]


@pytest.fixture
async def agent() -> AsyncIterator[str]:
    """One node's agent on 127.0.0.1 whose back-fill holds the whole story: steps, the fault, the recovery."""
    start = time.time() - 60.0
    fake = FakeAgent(_node_info(start), _running(), interval=0.05)
    fake.push(telemetry_pb2.Telemetry(step_reports=_steps(1, FAULT_STEP, start)))
    fake.push(telemetry_pb2.Telemetry(events=_fault_events(start)))
    fake.push(telemetry_pb2.Telemetry(step_reports=_steps(FAULT_STEP + 1, LAST_STEP, start)))
    server, address = await serve(fake)
    yield address
    await server.stop(None)


async def test_the_header_shows_the_runs_ettr_beside_the_restart_count(agent: str) -> None:
    app = DashboardApp([agent])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: f"step {LAST_STEP}/" in header_text(app), "the last step in the header")
        await until(pilot, lambda: "ETTR" in header_text(app), "the ETTR in the header")
        header = header_text(app)
        assert f"restarts 1! | ETTR {EXPECTED_ETTR}" in header
        fault_line = app.screen.query_one(FaultBar).text.plain
        assert "; recovered in place from step 20, MTTR 1.9s, 0 steps redone (total 81 ms: re-form 66 ms" in fault_line


async def test_enter_on_the_recovered_event_shows_its_breakdown(agent: str) -> None:
    app = DashboardApp([agent])
    async with app.run_test(size=SIZE) as pilot:
        events = app.screen.query_one(EventsTable)
        await until(pilot, lambda: _row_of(events, "recovered") is not None, "the recovered event in the log")
        events.focus()
        row = _row_of(events, "recovered")
        assert row is not None
        events.move_cursor(row=row, animate=False)
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, EventDetailScreen), "the event's screen")
        words = rendered_words(app)
        for line in (
            "re-form 66 ms (failure seen to the new group formed)",
            "state transfer 12 ms, 11.5 MiB from rank 0",
            "replacement ready 21 ms (fork to joining the group)",
            "total 81 ms (failure seen to every rank training again)",
            "steps redone 0",
            "replaced ranks 2",
            "donor rank 0",
            "generation 1",
        ):
            assert line in words, line


def _row_of(events: EventsTable, kind: str) -> int | None:
    return next(
        (i for i, key in enumerate(events.shown_keys) if events.get_cell(key, "kind").plain.strip() == kind), None
    )


def _write_record(run_dir: Path, start: float) -> None:
    """The same story, recorded as the agent records it, a batch per step (long enough for a replay keyframe)."""
    writer = RecordWriter(run_paths.record_file(run_dir, "node0"), node="node0", run_id="rec")
    info = _node_info(start)
    events = _fault_events(start)
    for step in range(1, LAST_STEP + 1):
        batch = telemetry_pb2.Telemetry(step_reports=_steps(step, step, start), rank_statuses=_running())
        batch.node_info.CopyFrom(info)
        if step == FAULT_STEP + 1:
            batch.events.extend(events)
        writer.add_batch(batch)
    writer.close()


def test_replay_at_recovered_starts_at_the_recovery(tmp_path: Path) -> None:
    start = time.time() - 600.0
    _write_record(tmp_path, start)
    replay = Replay.open([tmp_path], index=False)
    recovered = next(e for e in _fault_events(start) if e.kind == "recovered")
    assert resolve_at(replay, "recovered") == pytest.approx(recovered.wall_time)


async def test_a_replay_shows_the_same_ettr(tmp_path: Path) -> None:
    _write_record(tmp_path, time.time() - 600.0)
    replay = Replay.open([tmp_path])
    try:
        app = DashboardApp(replay=replay)
        async with app.run_test(size=SIZE) as pilot:
            await until(pilot, lambda: "REPLAY" in header_text(app), "the REPLAY marker")
            await pilot.press("t")
            await until(pilot, lambda: isinstance(app.screen, SeekScreen), "the go-to question")
            await pilot.press(*f"step {LAST_STEP}", "enter")
            await until(pilot, lambda: app.model.header().step == LAST_STEP, f"the cursor at step {LAST_STEP}")
            await until(pilot, lambda: f"ETTR {EXPECTED_ETTR}" in header_text(app), "the ETTR in the header")
            assert app.model.restarts()[0].in_place
            # Back to the start and to the end again: the model comes from the keyframe the indexer pickled.
            assert replay.wait_indexed(timeout=120)
            app.seek(replay.start)
            assert app.model.header().restarts == 0  # the cursor is before the fault again
            app.seek(replay.end)
            await until(pilot, lambda: f"ETTR {EXPECTED_ETTR}" in header_text(app), "the ETTR from the keyframe")
    finally:
        replay.close()
