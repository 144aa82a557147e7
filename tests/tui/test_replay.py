"""The dashboard on a recorded run (``megascope replay``): the cursor's keys, the REPLAY header, seeks that rebuild
the model as it was, and read-only by nature. Driven by Pilot over a small record written by the real writer."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from support.tui import SIZE, header_text, until

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.replay import Replay, ReplayError, resolve_at
from megascope.dashboard.screens.diagnosis import DiagnosisScreen
from megascope.dashboard.screens.replay_seek import SeekScreen
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2
from megascope.protos.recording import RecordWriter

STEPS = 300
START = float(int(time.time()) - 1200)
CRASH_STEP, HANG_STEP = 100, 200


def _at(step: int) -> float:
    return START + step * 0.5


def write_record(run_dir: Path, run_id: str = "run-r") -> None:
    """Two nodes of two ranks, a step every 0.5 s; rank 3 crashes at step 100, rank 2 hangs at step 200 (stacks)."""
    for n in range(2):
        node = f"node{n}"
        writer = RecordWriter(run_paths.record_file(run_dir, node), node=node, run_id=run_id)
        info = telemetry_pb2.NodeInfo(node=node, run_id=run_id, ranks=[2 * n, 2 * n + 1], world_size=4,
                                      total_steps=STEPS, start_wall_time=START)  # fmt: skip
        for step in range(STEPS):
            batch = telemetry_pb2.Telemetry(
                step_reports=[
                    telemetry_pb2.StepReport(
                        node=node,
                        rank=r,
                        world_size=4,
                        step=step,
                        loss=3 - step / STEPS,
                        step_seconds=0.5,
                        tokens=1024,
                        wall_time=_at(step),
                    )
                    for r in (2 * n, 2 * n + 1)
                ],  # fmt: skip
                rank_statuses=[
                    telemetry_pb2.RankStatus(rank=r, state=telemetry_pb2.RANK_STATE_RUNNING) for r in info.ranks
                ],
            )
            batch.node_info.CopyFrom(info)
            if n == 1 and step == CRASH_STEP:
                crash = telemetry_pb2.CrashDetail(signal="SIGKILL")
                batch.events.append(
                    telemetry_pb2.Event(
                        wall_time=_at(step),
                        node=node,
                        kind="crash",
                        severity=3,
                        rank=3,
                        text="rank 3 crashed",
                        crash=crash,
                    )
                )
            if n == 1 and step == HANG_STEP:
                hang = telemetry_pb2.HangDetail(culprit_rank=2)
                batch.events.append(
                    telemetry_pb2.Event(
                        wall_time=_at(step), node=node, kind="hang", severity=3, rank=2, text="rank 2 hangs", hang=hang
                    )
                )
                stacks = agent_pb2.DumpStacksResponse(
                    culprit=2, reason="rank 2 lags",
                    ranks=[agent_pb2.RankStacks(rank=r, answered=True, method="signal", last_step=step,
                                                collectives_issued=10 if r == 2 else 12, text=f"stack of rank {r}")
                           for r in (2, 3)],
                )  # fmt: skip
                writer.add_stacks(stacks, _at(step))
            writer.add_batch(batch)
        writer.close()


@pytest.fixture
def replay(tmp_path: Path) -> Replay:
    write_record(tmp_path)
    return Replay.open([tmp_path])


async def test_the_header_says_replay_and_the_cursors_time(replay: Replay) -> None:
    app = DashboardApp(replay=replay)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "REPLAY" in header_text(app), "the REPLAY marker")
        assert time.strftime("%H:%M:%S", time.localtime(START)) in header_text(app)
        assert app.control.readonly


async def test_n_jumps_to_the_next_incident_and_the_model_is_as_it_was_then(replay: Replay) -> None:
    app = DashboardApp(replay=replay)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("n")
        assert replay.cursor == _at(CRASH_STEP)
        assert app.model.header().step == CRASH_STEP and [f.kind for f in app.model.faults()] == ["crash"]
        await pilot.press("n")
        assert replay.cursor == _at(HANG_STEP) and [f.kind for f in app.model.faults()] == ["crash", "hang"]
        await pilot.press("N")
        assert replay.cursor == _at(CRASH_STEP) and [f.kind for f in app.model.faults()] == ["crash"]


async def test_t_goes_to_a_step(replay: Replay) -> None:
    app = DashboardApp(replay=replay)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("t")
        await until(pilot, lambda: isinstance(app.screen, SeekScreen), "the go-to question")
        await pilot.press(*"step 250", "enter")
        await until(pilot, lambda: replay.cursor == _at(250), "the cursor at step 250")
        assert app.model.header().step == 250


async def test_space_plays_the_record_forward(replay: Replay) -> None:
    app = DashboardApp(replay=replay, tick_seconds=0.05)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("plus", "plus", "plus")  # 10x: a few steps per tick
        await pilot.press("space")
        await until(pilot, lambda: replay.cursor > START + 2, "the cursor moving")
        await pilot.press("space")
        stopped = replay.cursor
        await pilot.pause(0.3)
        assert replay.cursor == stopped and "stopped 10x" in header_text(app)


async def test_the_diagnosis_screen_shows_the_stacks_recorded_by_the_cursor(replay: Replay) -> None:
    app = DashboardApp(replay=replay)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, DiagnosisScreen), "the diagnosis screen")
        screen = app.screen
        assert isinstance(screen, DiagnosisScreen)
        assert screen.stacks is None and "no stacks were recorded" in screen.note
        app.seek(_at(HANG_STEP))  # the screen follows the cursor
        assert screen.stacks is not None and screen.stacks.culprit == 2
        assert {row.rank: row.text for row in screen.stacks.rows} == {2: "stack of rank 2", 3: "stack of rank 3"}


def test_a_seek_back_rebuilds_the_model_a_fresh_pass_would_build(replay: Replay) -> None:
    assert replay.wait_indexed(60)
    replay.seek(replay.end)
    replay.seek(_at(150))
    fresh = Replay(replay.items, index=False)
    fresh.seek(_at(150))
    assert replay.model.header() == fresh.model.header()
    assert replay.model.rank_rows() == fresh.model.rank_rows()


def test_at_names_an_incident_a_step_or_what_is_not_there(replay: Replay) -> None:
    assert resolve_at(replay, "hang") == _at(HANG_STEP)
    assert resolve_at(replay, "step 10") == _at(10)
    assert resolve_at(replay, "+30") == START + 30
    assert resolve_at(replay, "job_failed") == "the record holds no 'job_failed' event"
    assert "never reaches step" in str(resolve_at(replay, "step 99999"))


def test_records_of_two_runs_are_refused_by_name(tmp_path: Path) -> None:
    write_record(tmp_path / "a", run_id="run-a")
    write_record(tmp_path / "b", run_id="run-b")
    with pytest.raises(ReplayError, match="different runs"):
        Replay.open([tmp_path / "a", tmp_path / "b"])


async def test_every_screen_opens_on_a_replay(replay: Replay) -> None:
    from megascope.dashboard.screens.checkpoints import CheckpointsScreen
    from megascope.dashboard.screens.heat_map import HeatMapScreen
    from megascope.dashboard.screens.help import HelpScreen
    from megascope.dashboard.screens.node import NodeScreen
    from megascope.dashboard.screens.training import TrainingScreen

    app = DashboardApp(replay=replay)
    async with app.run_test(size=SIZE) as pilot:
        app.seek(_at(HANG_STEP))
        for key, screen in (
            ("g", TrainingScreen),
            ("h", HeatMapScreen),
            ("c", CheckpointsScreen),
            ("question_mark", HelpScreen),
        ):
            await pilot.press(key)
            await until(pilot, lambda screen=screen: isinstance(app.screen, screen), screen.__name__)  # type: ignore[misc]
            await pilot.pause(0.2)
            await pilot.press("escape")
            await until(pilot, lambda screen=screen: not isinstance(app.screen, screen), f"{screen.__name__} closed")  # type: ignore[misc]
        app.push_screen(NodeScreen("record:node1"))
        await until(pilot, lambda: isinstance(app.screen, NodeScreen), "the node screen")
        await pilot.pause(0.2)
        assert "REPLAY" in header_text(app)
