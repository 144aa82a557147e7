"""The Textual dashboard, driven by Pilot: against an in-test gRPC agent, against the real agent, and as
snapshots of a fixed cluster model.

Snapshots are the SVG screenshots in tests/tui/snapshots/. After an intended change to what a screen shows,
regenerate them with ``MEGASCOPE_UPDATE_SNAPSHOTS=1 python -m pytest tests/tui/test_dashboard_app.py`` and look
at the SVGs before committing.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support import REPO
from support.fake_agent import FakeAgent, serve, synthetic_model
from support.tui import (  # noqa: F401
    SIZE,
    assert_snapshot,
    cell,
    drawn,
    header_text,
    rendered_text,
    svg_lines,
    until,
)
from support.wire import running
from support.wire import step_report as report

from megascope.dashboard.app import TICK_SECONDS, DashboardApp, help_keys
from megascope.dashboard.connection import watch_agent
from megascope.dashboard.model.cluster import ClusterModel, ConnectionState
from megascope.dashboard.screens.help import HelpScreen
from megascope.dashboard.screens.main import MainScreen
from megascope.dashboard.screens.node import NodeScreen
from megascope.dashboard.widgets.tables import KeyedTable
from megascope.protos.events import make_event
from megascope.protos.megascope.v1 import telemetry_pb2

# -- helpers -----------------------------------------------------------------------------------------------


@pytest.fixture
async def agent() -> AsyncIterator[tuple[FakeAgent, object, str]]:
    """A 2-rank node served by an in-test AgentService on 127.0.0.1, back-fill: step 1 of both ranks."""
    info = telemetry_pb2.NodeInfo(
        node="node0", ranks=[0, 1], world_size=2, start_wall_time=time.time(), total_steps=100,
        gpu_available=False, gpu_status="no GPU: NVML Shared Library Not Found",
    )  # fmt: skip
    fake = FakeAgent(info, [running(0), running(1)], interval=0.05)
    fake.push(telemetry_pb2.Telemetry(step_reports=[report(0, 1), report(1, 1)]))
    server, address = await serve(fake)
    yield fake, server, address
    await server.stop(None)


# -- against an in-test agent ------------------------------------------------------------------------------


async def test_rows_for_every_rank_appear(agent: tuple[FakeAgent, object, str]) -> None:
    _, _, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: cell(app, "ranks", "1", "status") == "RUNNING", "rank 1 RUNNING")
        assert cell(app, "ranks", "0", "status") == "RUNNING"
        assert cell(app, "ranks", "0", "step") == "1"
        assert cell(app, "nodes", address, "connection") == "CONNECTED"
        assert cell(app, "nodes", address, "gpu") == "no GPU"


async def test_enter_on_a_node_row_opens_the_node_screen_and_esc_returns(
    agent: tuple[FakeAgent, object, str],
) -> None:
    _, _, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: cell(app, "nodes", address, "node") == "node0", "node0 named")
        app.screen.query_one("#nodes").focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, NodeScreen), "the node screen")
        assert isinstance(app.screen, NodeScreen) and app.screen.agent == address
        await until(pilot, lambda: cell(app, "node-ranks", "1", "rank") == "1", "the node's ranks")
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_p_shows_paused_and_freezes_the_view_while_data_keeps_coming(
    agent: tuple[FakeAgent, object, str],
) -> None:
    fake, _, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: cell(app, "ranks", "1", "step") == "1", "step 1 shown")
        await pilot.press("p")
        assert "PAUSED" in header_text(app)
        fake.push(telemetry_pb2.Telemetry(step_reports=[report(0, 2), report(1, 2)]))
        await until(pilot, lambda: app.model.header().step == 2, "the model to take in step 2")
        await pilot.pause(0.5)  # more than one redraw tick
        assert cell(app, "ranks", "1", "step") == "1"
        await pilot.press("p")
        assert "PAUSED" not in header_text(app)
        await until(pilot, lambda: cell(app, "ranks", "1", "step") == "2", "step 2 shown after resuming")


async def test_ranks_of_an_unmodified_script_say_what_step_telemetry_needs() -> None:
    model = ClusterModel(["127.0.0.1:1"])
    model.set_connected("127.0.0.1:1")
    guarded = [running(r) for r in (0, 1)]
    for status in guarded:
        status.source = telemetry_pb2.RANK_SOURCE_PROCESS
    model.ingest("127.0.0.1:1", telemetry_pb2.Telemetry(rank_statuses=guarded))
    app = DashboardApp(model=model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause(2 * TICK_SECONDS)
        title = str(app.screen.query_one("#ranks", KeyedTable).border_title)
        assert "2 process only: step telemetry: add megascope.api.step()" in title


@pytest.mark.parametrize("key", ["question_mark", "f1"])
async def test_help_key_opens_help_listing_every_key(key: str) -> None:
    app = DashboardApp(model=ClusterModel())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press(key)
        assert isinstance(app.screen, HelpScreen)
        help_text = rendered_text(app)
        for _ in range(4):  # help scrolls inside a box no taller than the terminal
            await pilot.press("pagedown")
            await pilot.pause()
            help_text += rendered_text(app)
        for row in help_keys():
            assert row.keys in help_text, row.keys
        assert "red >= 1.25x" in help_text  # the thresholds are listed too
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_hjkl_and_arrows_move_the_table_cursor() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=SIZE) as pilot:
        table = app.screen.query_one("#ranks", KeyedTable)
        table.focus()
        await pilot.press("j", "j")
        assert table.cursor_row == 2
        await pilot.press("k")
        assert table.cursor_row == 1
        await pilot.press("down")
        assert table.cursor_row == 2
        await pilot.press("up")
        assert table.cursor_row == 1


async def test_q_quits() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("q")
        await pilot.pause()
        assert not app.is_running


async def test_event_log_shows_the_newest_event_at_the_bottom_with_a_text_tag(
    agent: tuple[FakeAgent, object, str],
) -> None:
    fake, _, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: cell(app, "ranks", "1", "step") == "1", "step 1 shown")
        for i, severity in enumerate([telemetry_pb2.Event.SEVERITY_INFO, telemetry_pb2.Event.SEVERITY_ERROR]):
            crash = telemetry_pb2.CrashDetail(signal="SIGKILL")
            event = make_event(f"event {i}", crash, severity=severity, node="node0", wall_time=time.time() + i)
            fake.push(telemetry_pb2.Telemetry(events=[event]))
        table = app.screen.query_one("#events", KeyedTable)
        await until(pilot, lambda: table.row_count >= 2 and _last_row(table)[-1] == "event 1", "event 1 last")
        assert _last_row(table)[2] == "ERROR"  # the severity is written out, not only coloured
        assert table.cursor_row == table.row_count - 1  # the log follows the newest event


def _last_row(table: KeyedTable) -> list[str]:
    return [c.plain.strip() for c in table.get_row_at(table.row_count - 1)]


async def test_an_agent_that_vanishes_shows_its_node_and_ranks_lost(agent: tuple[FakeAgent, object, str]) -> None:
    _, server, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: cell(app, "ranks", "1", "status") == "RUNNING", "rank 1 RUNNING")
        await server.stop(None)  # type: ignore[attr-defined]  # the stream breaks: no goodbye from the agent
        await until(pilot, lambda: cell(app, "nodes", address, "connection").startswith("LOST"), "LOST")
        assert cell(app, "ranks", "0", "status") == "LOST"
        assert cell(app, "ranks", "1", "status") == "LOST"
        events = app.screen.query_one("#events", KeyedTable)
        await until(pilot, lambda: _last_row(events)[5] == "node_lost", "the node_lost event")
        assert app.is_running


async def test_redraws_follow_the_tick_not_the_stream(agent: tuple[FakeAgent, object, str]) -> None:
    fake, _, address = agent
    fake.interval = 0.001  # the agent streams as fast as it can
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: cell(app, "ranks", "1", "step") == "1", "step 1 shown")
        started, frames_before, batches_before = time.monotonic(), app.frames, app.model.agents[address].batches
        for step in range(2, 302):
            fake.push(telemetry_pb2.Telemetry(step_reports=[report(0, step), report(1, step)]))
            if step % 50 == 0:
                await pilot.pause(0.1)
        await pilot.pause(0.5)
        ticks = (time.monotonic() - started) / TICK_SECONDS
        assert app.model.agents[address].batches - batches_before > 50  # many batches arrived ...
        assert app.frames - frames_before <= ticks + 2  # ... yet frames came at the tick rate
        await until(pilot, lambda: cell(app, "ranks", "1", "step") == "301", "the last step shown")


# -- the connection task, without the TUI ------------------------------------------------------------------


async def _wait_state(model: ClusterModel, address: str, state: ConnectionState, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while model.agents[address].state is not state:
        assert time.monotonic() < deadline, f"{address} never became {state.value}"
        await asyncio.sleep(0.02)


async def test_watch_reconnects_when_the_agent_comes_back(agent: tuple[FakeAgent, object, str]) -> None:
    fake, server, address = agent
    model = ClusterModel([address])
    task = asyncio.create_task(watch_agent(model, address, initial_backoff=0.05, max_backoff=0.2))
    try:
        await _wait_state(model, address, ConnectionState.CONNECTED)
        await server.stop(None)  # type: ignore[attr-defined]
        await _wait_state(model, address, ConnectionState.LOST)
        again, _ = await serve(fake, port=int(address.rsplit(":", 1)[1]))
        try:
            await _wait_state(model, address, ConnectionState.CONNECTED)
        finally:
            await again.stop(None)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_watch_on_an_unreachable_agent_retries_without_raising() -> None:
    address = "127.0.0.1:1"
    model = ClusterModel([address])
    task = asyncio.create_task(watch_agent(model, address, initial_backoff=0.05))
    await _wait_state(model, address, ConnectionState.DISCONNECTED)
    assert model.agents[address].error.startswith("refused: nothing listens")
    await asyncio.sleep(0.3)  # several retries
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


# -- snapshots of a fixed cluster (deterministic: synthetic data, frozen clock, UTC) -------------------------


async def test_main_screen_snapshot(utc: None, tmp_path: Path) -> None:
    app = DashboardApp(model=synthetic_model(gpus=2, unreachable=["10.0.0.9:50051"]))
    async with app.run_test(size=SIZE) as pilot:
        await drawn(app, pilot)
        assert_snapshot(app, "main_screen", tmp_path)


async def test_node_screen_snapshot(utc: None, tmp_path: Path) -> None:
    app = DashboardApp(model=synthetic_model(gpus=2))
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one("#nodes").focus()
        await pilot.press("down", "enter")  # node1, home of the straggler
        await drawn(app, pilot)
        assert isinstance(app.screen, NodeScreen)
        assert_snapshot(app, "node_screen", tmp_path)


async def test_help_screen_snapshot(utc: None, tmp_path: Path) -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        assert_snapshot(app, "help_screen", tmp_path)


# -- the command line --------------------------------------------------------------------------------------


def test_bad_agents_address_is_refused_naming_the_flag() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "megascope.dashboard.dashboard_cli", "--agents", "127.0.0.1:50051,nonsense"],
        capture_output=True, text=True, timeout=60, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--agents" in result.stderr and "'nonsense' is not HOST:PORT" in result.stderr
    assert "Traceback" not in result.stderr
