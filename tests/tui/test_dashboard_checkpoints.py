"""The checkpoints screen (``c``), driven by Pilot against a real agent server with real checkpoints and a real
merge process (the stand-in of ``megascope merge``, which keeps its contract;
tests/integration/test_agent_merge.py runs the real command), plus the screen's pure logic: naming the inputs
and drawing the result.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from support.agents import serve, write_checkpoints
from support.tui import until
from textual.pilot import Pilot
from textual.widgets import Input, Select

from megascope.agent.server import AgentServer
from megascope.dashboard.app import DashboardApp
from megascope.dashboard.model.checkpoints import (
    Inputs,
    InputsError,
    merge_request,
    parse_inputs,
    toggle_step,
    val_loss_chart,
)
from megascope.dashboard.screens.checkpoints import CheckpointsScreen
from megascope.dashboard.widgets.tables import KeyedTable
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

SIZE = (160, 48)
COMMITTED = [10, 20, 30, 40]


def cell(app: DashboardApp, row: str, column: str) -> str:
    table = app.screen.query_one("#ckpt-table", KeyedTable)
    return table.get_cell(row, column).plain.strip() if row in table.rows else ""


def text_of(app: DashboardApp, widget_id: str) -> str:
    return str(app.screen.query_one(f"#{widget_id}").render())


@pytest.fixture
async def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[AgentServer]:
    """An agent server whose run has checkpoints 10..40 and reported a validation loss at step 20."""
    monkeypatch.setenv("STAND_IN_SECONDS", "1")
    write_checkpoints(tmp_path / "ckpt", tuple(COMMITTED))
    server = await serve(tmp_path / "ckpt")
    server.state.add_step(telemetry_pb2.StepReport(rank=0, step=20, val_loss=3.25))
    try:
        yield server
    finally:
        await server.merges.close()
        await server.stop(0.1)


async def open_checkpoints(app: DashboardApp, pilot: Pilot[int]) -> None:
    await pilot.press("c")
    await until(pilot, lambda: isinstance(app.screen, CheckpointsScreen), "the checkpoints screen")
    await until(pilot, lambda: cell(app, "step:40", "step") == "40", "the listing", 30)


async def test_c_lists_every_committed_checkpoint_with_its_val_loss_when_known(agent: AgentServer) -> None:
    app = DashboardApp([agent.address])
    async with app.run_test(size=SIZE) as pilot:
        await open_checkpoints(app, pilot)
        assert [cell(app, f"step:{s}", "step") for s in COMMITTED] == ["10", "20", "30", "40"]
        assert cell(app, "step:20", "val_loss") == "3.2500" and cell(app, "step:10", "val_loss") == "-"
        assert cell(app, "step:10", "kind") == "train" and cell(app, "step:10", "world") == "1"
        assert cell(app, "step:10", "size").endswith("KiB")
        # The default inputs ("last 4") mark the four checkpoints they take.
        assert [cell(app, f"step:{s}", "use") for s in COMMITTED] == ["✓"] * 4
        assert str(agent.merges.ckpt_dir) in text_of(app, "ckpt-where")
        await pilot.press("escape")
        assert not isinstance(app.screen, CheckpointsScreen)


async def test_readonly_dashboard_refuses_to_merge_and_sends_nothing(agent: AgentServer) -> None:
    app = DashboardApp([agent.address], readonly=True)
    async with app.run_test(size=SIZE) as pilot:
        await open_checkpoints(app, pilot)
        await pilot.press("m")
        await pilot.press("x")
        await until(pilot, lambda: len(app._notifications) >= 2, "two notifications")
        messages = [n.message for n in app._notifications]
        assert "read-only dashboard (--readonly): no merge was started" in messages
        assert "read-only dashboard (--readonly): no cancel was sent" in messages
        await pilot.pause(0.3)
        assert agent.merges.status().state == agent_pb2.MERGE_STATE_UNSPECIFIED  # nothing reached the agent


async def test_merge_shows_progress_then_its_val_loss_against_its_inputs_and_is_listed(agent: AgentServer) -> None:
    app = DashboardApp([agent.address])
    async with app.run_test(size=SIZE) as pilot:
        await open_checkpoints(app, pilot)
        app.screen.query_one("#merge-inputs", Input).value = "20-40"
        app.screen.query_one("#merge-method", Select).value = "wma"
        await until(pilot, lambda: cell(app, "step:10", "use") == "" and cell(app, "step:20", "use") == "✓", "preview")
        await pilot.press("m")
        await until(pilot, lambda: "RUNNING" in text_of(app, "merge-status"), "the merge running", 30)
        await until(pilot, lambda: "DONE" in text_of(app, "merge-status"), "the merge done", 30)
        assert "wma of steps 20, 30, 40" in text_of(app, "merge-status")
        chart = text_of(app, "merge-result")
        assert "validation loss, lower is better" in chart
        for step, loss in ((20, "3.0200"), (30, "3.0100"), (40, "3.0000")):
            assert f"step {step}" in chart and loss in chart
        assert "merged" in chart and "2.9000" in chart
        assert "the merge beats every input: 0.1000 below the best (step 40)" in chart
        out = agent.merges.status().out
        await until(pilot, lambda: cell(app, f"merge:{out}", "kind") == "merge", "the merge listed", 30)
        assert cell(app, f"merge:{out}", "val_loss") == "2.9000"
    assert list(agent.merges.status().steps) == [20, 30, 40]


async def test_bad_inputs_are_named_on_the_form_and_nothing_is_sent(agent: AgentServer) -> None:
    app = DashboardApp([agent.address])
    async with app.run_test(size=SIZE) as pilot:
        await open_checkpoints(app, pilot)
        app.screen.query_one("#merge-inputs", Input).value = "last 9"
        await until(pilot, lambda: "only 4 committed" in text_of(app, "merge-preview"), "the problem named")
        await pilot.press("m")
        await until(pilot, lambda: bool(app._notifications), "a notification")
        assert "last 9: only 4 committed checkpoint(s)" in [n.message for n in app._notifications]
        assert agent.merges.status().state == agent_pb2.MERGE_STATE_UNSPECIFIED


async def test_x_cancels_the_running_merge(agent: AgentServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("STAND_IN_SECONDS", "30")
    app = DashboardApp([agent.address])
    async with app.run_test(size=SIZE) as pilot:
        await open_checkpoints(app, pilot)
        await pilot.press("m")
        await until(pilot, lambda: "merging" in text_of(app, "merge-status"), "the merge working", 30)
        await pilot.press("x")
        await until(pilot, lambda: "CANCELLED" in text_of(app, "merge-status"), "the merge cancelled", 30)
    assert agent.merges.status().state == agent_pb2.MERGE_STATE_CANCELLED


async def test_space_on_a_row_adds_or_removes_that_step(agent: AgentServer) -> None:
    app = DashboardApp([agent.address])
    async with app.run_test(size=SIZE) as pilot:
        await open_checkpoints(app, pilot)
        app.screen.query_one("#ckpt-table", KeyedTable).focus()
        await pilot.press("space")  # the cursor is on step 10, one of the default "last 4"
        assert app.screen.query_one("#merge-inputs", Input).value == "20, 30, 40"
        await until(pilot, lambda: cell(app, "step:10", "use") == "", "step 10 unmarked")
        await pilot.press("space")
        assert app.screen.query_one("#merge-inputs", Input).value == "10, 20, 30, 40"


# -- the pure part -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected", "picks"),
    [
        ("last 3", Inputs(last=3), [20, 30, 40]),
        ("  LAST 2  every 20 ", Inputs(last=2, every=20), [20, 40]),
        ("15-40", Inputs(steps=(20, 30, 40)), [20, 30, 40]),
        ("40..10", Inputs(steps=(10, 20, 30, 40)), [10, 20, 30, 40]),
        ("30, 10", Inputs(steps=(30, 10)), [10, 30]),
        ("10 20", Inputs(steps=(10, 20)), [10, 20]),
    ],
)
def test_inputs_line_names_the_checkpoints(text: str, expected: Inputs, picks: list[int]) -> None:
    inputs = parse_inputs(text, COMMITTED)
    assert inputs == expected and inputs.picks(COMMITTED) == picks


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("last 1", "at least 2"),
        ("last 5", "last 5: only 4 committed"),
        ("last 3 every 20", "no committed checkpoint at step 0"),
        ("10, 25", "no committed checkpoint at step 25"),
        ("35-40", "holds 1 committed checkpoint(s)"),
        ("10, 10", "listed twice"),
        ("newest", "is not 'last N'"),
    ],
)
def test_inputs_line_that_makes_no_merge_says_why(text: str, says: str) -> None:
    with pytest.raises(InputsError) as raised:
        parse_inputs(text, COMMITTED)
    assert says in str(raised.value)


def test_toggling_a_step_turns_the_line_into_explicit_steps() -> None:
    assert toggle_step("last 2", 20, COMMITTED) == "20, 30, 40"
    assert toggle_step("20, 30, 40", 30, COMMITTED) == "20, 40"
    assert toggle_step("nonsense", 10, COMMITTED) == "10"


def test_merge_request_sends_alpha_only_for_ema_and_refuses_a_bad_one() -> None:
    assert merge_request(Inputs(last=3), "sma", "0.5", True) == agent_pb2.StartMergeRequest(
        method="sma", last=3, eval=True
    )
    assert merge_request(Inputs(steps=(10, 20)), "ema", "", False).alpha == 0.2
    with pytest.raises(InputsError, match="alpha: must be in"):
        merge_request(Inputs(last=2), "ema", "1.5", False)


def test_chart_marks_the_merge_and_says_how_it_compares() -> None:
    chart = val_loss_chart({10: 3.5, 20: 3.4}, 3.45, 60).plain
    lines = chart.splitlines()
    assert lines[1].startswith("step 10 ") and lines[1].endswith(" 3.5000")
    assert lines[3].startswith(" merged ") and lines[3].endswith("3.4500 ◆")
    assert "│" in lines[1] and "│" in lines[2]
    assert lines[-1] == "the merge is 0.0500 above the best input (step 20), 0.0500 above the newest (step 20)"
    assert "no validation loss" in val_loss_chart({}, None, 60).plain


async def test_with_no_agent_answering_the_screen_names_that_not_a_missing_ckpt_dir() -> None:
    app = DashboardApp(["127.0.0.1:1"])  # nothing listens there: every call is refused
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, CheckpointsScreen), "the checkpoints screen")
        await until(pilot, lambda: "no agent answered" in text_of(app, "ckpt-where"), "the reason", 30)
        where = text_of(app, "ckpt-where")
        assert "--ckpt-dir" not in where
        assert "127.0.0.1:1:" in where  # the agent's own error follows
