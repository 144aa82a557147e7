"""``l`` on a rank: its stdout/stderr tail, live, from a fake agent's GetRankLog (the real agent's log is tested in
tests/unit/test_rank_log.py and tests/integration/test_rank_log_live.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import pytest
from support.fake_agent import FakeAgent, serve
from support.tui import SIZE, until
from support.wire import running
from support.wire import step_report as report
from textual.pilot import Pilot
from textual.widgets import RichLog, Static

from megascope.dashboard.app import DashboardApp, help_keys
from megascope.dashboard.screens.main import MainScreen
from megascope.dashboard.screens.node import NodeScreen
from megascope.dashboard.screens.rank_log import RankLogScreen
from megascope.protos.megascope.v1 import telemetry_pb2

TOKEN = "s3cret-token"


def node(ranks: list[int] = [0, 1]) -> FakeAgent:  # noqa: B006 (never mutated)
    info = telemetry_pb2.NodeInfo(node="node0", ranks=ranks, world_size=2, start_wall_time=time.time())
    fake = FakeAgent(info, [running(r) for r in ranks], interval=0.05)
    fake.push(telemetry_pb2.Telemetry(step_reports=[report(r, 7) for r in ranks]))
    return fake


@pytest.fixture
async def agent() -> AsyncIterator[tuple[FakeAgent, str]]:
    fake = node()
    fake.write_log(0, "rank 0 says hello", "loss 2.31")
    fake.write_log(1, "rank 1 says hello")
    fake.write_log(1, "Traceback (most recent call last):", stream=telemetry_pb2.LOG_STREAM_STDERR)
    server, address = await serve(fake)
    yield fake, address
    await server.stop(None)


def log_lines(app: DashboardApp) -> list[str]:
    return [strip.text.rstrip() for strip in app.screen.query_one(RichLog).lines]


def status_text(app: DashboardApp) -> str:
    return str(app.screen.query_one("#log-status", Static).render())


async def rows_shown(pilot: Pilot[int], app: DashboardApp, count: int) -> None:
    await until(pilot, lambda: app.screen.query_one("#ranks").row_count == count, f"{count} rank rows")


async def test_l_on_a_rank_row_opens_that_ranks_output_with_stderr_marked(agent: tuple[FakeAgent, str]) -> None:
    _, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await rows_shown(pilot, app, 2)
        app.screen.query_one("#ranks").focus()
        await pilot.press("down", "l")  # rank 1
        assert isinstance(app.screen, RankLogScreen)
        await until(pilot, lambda: len(log_lines(app)) == 2, "rank 1's two lines")
        assert log_lines(app) == ["  rank 1 says hello", "! Traceback (most recent call last):"]
        assert f"rank 1 on {address}" in status_text(app)


async def test_the_log_shows_new_lines_as_the_rank_writes_them(agent: tuple[FakeAgent, str]) -> None:
    fake, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await rows_shown(pilot, app, 2)
        await pilot.press("l")  # rank 0: the first row
        await until(pilot, lambda: len(log_lines(app)) == 2, "rank 0's lines")
        fake.write_log(0, "loss 2.05")
        await until(pilot, lambda: len(log_lines(app)) == 3, "the new line, at a later ask")
        assert log_lines(app) == ["  rank 0 says hello", "  loss 2.31", "  loss 2.05"]  # each line once


async def test_a_reader_who_scrolled_up_keeps_their_place_while_lines_come(agent: tuple[FakeAgent, str]) -> None:
    fake, address = agent
    fake.write_log(0, *(f"line {i}" for i in range(200)))
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await rows_shown(pilot, app, 2)
        await pilot.press("l")
        await until(pilot, lambda: len(log_lines(app)) == 202, "every line")
        log = app.screen.query_one(RichLog)
        await until(pilot, lambda: log.max_scroll_y > 0 and log.scroll_y == log.max_scroll_y, "following the end")
        log.scroll_home(animate=False)
        await pilot.pause()
        fake.write_log(0, "one more")
        await until(pilot, lambda: len(log_lines(app)) == 203, "the new line")
        assert log.scroll_y == 0
        await until(pilot, lambda: "scrolled up (end: follow)" in status_text(app), "the status says so")
        await pilot.press("end")
        fake.write_log(0, "and another")
        await until(pilot, lambda: len(log_lines(app)) == 204, "the next line")
        await until(pilot, lambda: log.scroll_y == log.max_scroll_y, "following again")


async def test_esc_closes_the_log(agent: tuple[FakeAgent, str]) -> None:
    _, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await rows_shown(pilot, app, 2)
        await pilot.press("l")
        assert isinstance(app.screen, RankLogScreen)
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_l_on_the_node_screen_opens_the_log_of_a_rank_of_that_node(agent: tuple[FakeAgent, str]) -> None:
    _, address = agent
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.screen.query_one("#nodes").row_count == 1, "the node row")
        app.screen.query_one("#nodes").focus()
        await pilot.press("enter")
        assert isinstance(app.screen, NodeScreen)
        await until(pilot, lambda: app.screen.query_one("#node-ranks").row_count == 2, "the node's ranks")
        app.screen.query_one("#node-ranks").focus()
        await pilot.press("l")
        assert isinstance(app.screen, RankLogScreen)
        await until(pilot, lambda: log_lines(app) == ["  rank 0 says hello", "  loss 2.31"], "rank 0's lines")


async def test_a_readonly_dashboard_reads_logs_and_sends_its_token(agent: tuple[FakeAgent, str]) -> None:
    fake, address = agent
    app = DashboardApp([address], readonly=True, token=TOKEN)
    async with app.run_test(size=SIZE) as pilot:
        await rows_shown(pilot, app, 2)
        await pilot.press("l")
        await until(pilot, lambda: len(log_lines(app)) == 2, "rank 0's lines")
        _request, metadata = fake.rank_log_calls[0]
        assert metadata.get("authorization") == f"Bearer {TOKEN}"


async def test_an_agent_too_old_for_the_call_is_named_in_one_line() -> None:
    fake = node()
    fake.rank_logs = None
    server, address = await serve(fake)
    try:
        app = DashboardApp([address])
        async with app.run_test(size=SIZE) as pilot:
            await rows_shown(pilot, app, 2)
            await pilot.press("l")
            await until(pilot, lambda: "too old" in status_text(app), "the reason")
            assert status_text(app) == (
                f"the agent at {address} is too old to send rank logs (no GetRankLog): upgrade megascope on that "
                "node and restart its agent"
            )
    finally:
        await server.stop(None)


async def test_a_rank_the_agent_does_not_know_is_named_in_one_line() -> None:
    fake = node()
    del fake.node_info.ranks[:]  # the rows come from its statuses; the agent's own list no longer has the ranks
    server, address = await serve(fake)
    try:
        app = DashboardApp([address])
        async with app.run_test(size=SIZE) as pilot:
            await rows_shown(pilot, app, 2)
            await pilot.press("l")
            await until(pilot, lambda: "is not on the agent" in status_text(app), "the reason")
            assert status_text(app).startswith(f"rank 0 is not on the agent at {address}: rank 0 does not run")
    finally:
        await server.stop(None)


async def test_an_agent_that_went_away_is_named_with_the_reason() -> None:
    fake = node()
    server, address = await serve(fake)
    app = DashboardApp([address])
    async with app.run_test(size=SIZE) as pilot:
        await rows_shown(pilot, app, 2)
        await server.stop(None)
        await pilot.press("l")
        await until(pilot, lambda: "cannot be reached" in status_text(app), "the reason", timeout=30)
        assert status_text(app).startswith(f"the agent at {address} cannot be reached: ")


def test_help_lists_l() -> None:
    assert any(row.keys == "l" and "stdout/stderr" in row.what for row in help_keys())
