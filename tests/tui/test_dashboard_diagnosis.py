"""Stacks on demand (``s``), the diagnosis screen and restarts (``r``), driven by Pilot against two fake agents.

The fake agents answer DumpStacks with canned faulthandler text; the real agent's stack collection and
diagnosis are tested in tests/unit/test_diagnosis.py and tests/integration/test_fault_tolerance.py.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from support.fake_agent import FakeAgent, faulthandler_text, serve, synthetic_model
from support.tui import SIZE, assert_snapshot, cell, drawn, until
from support.wire import running
from support.wire import step_report as report
from textual.pilot import Pilot
from textual.widgets import Static

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.dashboard_cli import add_arguments
from megascope.dashboard.model.diagnosis import AgentStacks, job_stacks
from megascope.dashboard.screens.confirm import ConfirmScreen
from megascope.dashboard.screens.diagnosis import DiagnosisScreen
from megascope.dashboard.screens.main import MainScreen
from megascope.protos.events import make_event
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2

ALL_REDUCE = faulthandler_text(
    ("/venv/torch/distributed/distributed_c10d.py", 2501, "all_reduce"),
    ("/work/megascope/engine/trainer.py", 310, "_sync_gradients"),
    ("/work/megascope/engine/trainer.py", 280, "train"),
)
DATA_WAIT = faulthandler_text(
    ("/work/megascope/engine/data.py", 88, "_next_document"),
    ("/work/megascope/engine/data.py", 120, "next_batch"),
    ("/work/megascope/engine/trainer.py", 265, "train"),
)


def rank_stacks(rank: int, text: str, collectives: int) -> agent_pb2.RankStacks:
    return agent_pb2.RankStacks(
        rank=rank, pid=1000 + rank, answered=True, method="signal", text=text, last_step=41,
        collectives_issued=collectives,
    )  # fmt: skip


def node(name: str, ranks: list[int]) -> FakeAgent:
    """The agents found the job hung: every rank HUNG (stacks taken of a job that steps blame nobody)."""
    info = telemetry_pb2.NodeInfo(node=name, ranks=ranks, world_size=4, start_wall_time=time.time())
    fake = FakeAgent(info, [running(r, telemetry_pb2.RANK_STATE_HUNG) for r in ranks], interval=0.05)
    fake.push(telemetry_pb2.Telemetry(step_reports=[report(r, 41) for r in ranks]))
    return fake


@pytest.fixture
async def agents() -> AsyncIterator[tuple[list[FakeAgent], list[str]]]:
    """node0 (ranks 0, 1) and node1 (ranks 2, 3), at step 41 with a checkpoint of step 40. Rank 3 hangs: it
    waits on data with fewer collectives issued while the others wait for it in all_reduce."""
    node0, node1 = node("node0", [0, 1]), node("node1", [2, 3])
    saved = telemetry_pb2.CheckpointDetail(phase=telemetry_pb2.CheckpointDetail.PHASE_SAVED, step=40)
    checkpoint = make_event("saved", saved, node="node0", step=40)
    node0.push(telemetry_pb2.Telemetry(events=[checkpoint]))
    node0.stacks = agent_pb2.DumpStacksResponse(
        ranks=[rank_stacks(0, ALL_REDUCE, 168), rank_stacks(1, ALL_REDUCE, 168)], culprit=-1, reason="same"
    )
    node1.stacks = agent_pb2.DumpStacksResponse(
        ranks=[rank_stacks(2, ALL_REDUCE, 168), rank_stacks(3, DATA_WAIT, 164)], culprit=3, reason="rank 3 lags"
    )
    servers, addresses = [], []
    for fake in (node0, node1):
        server, address = await serve(fake)
        servers.append(server)
        addresses.append(address)
    yield [node0, node1], addresses
    for server in servers:
        await server.stop(None)


async def connected(pilot: Pilot[int], app: DashboardApp) -> None:
    await until(pilot, lambda: len(app.control.connected_agents()) == len(app.control.agents), "every agent connected")
    await until(pilot, lambda: app.model.newest_checkpoint_step() == 40, "the checkpoint event")


def summary_text(app: DashboardApp) -> str:
    return str(app.screen.query_one("#diagnosis-summary", Static).render())


def stack_text(app: DashboardApp) -> str:
    return str(app.screen.query_one("#stack-text", Static).render())


def notifications(app: DashboardApp) -> list[str]:
    return [n.message for n in app._notifications]


# -- s: stacks and the diagnosis screen --------------------------------------------------------------------


async def test_s_opens_the_diagnosis_screen_with_stacks_grouped_and_the_culprit_marked(
    agents: tuple[list[FakeAgent], list[str]],
) -> None:
    fakes, addresses = agents
    app = DashboardApp(addresses)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("s")
        assert isinstance(app.screen, DiagnosisScreen)
        screen = app.screen
        await until(pilot, lambda: screen.stacks is not None and "culprit" in summary_text(app), "the diagnosis")
        assert [call[0] for fake in fakes for call in fake.control_calls] == ["DumpStacks", "DumpStacks"]
        # Job-wide: rank 3 issued fewer collectives than every other rank of the job.
        assert "culprit: rank 3 on node1: rank 3 lags" in summary_text(app)
        assert cell(app, "stack-ranks", "3", "rank") == "3!!"
        assert cell(app, "stack-ranks", "0", "rank") == "0"
        assert cell(app, "stack-ranks", "3", "collectives") == "164"
        assert cell(app, "stack-ranks", "3", "stacks") == "signal"
        # Two groups: the three ranks in all_reduce, and rank 3 alone (the odd one, marked).
        assert (cell(app, "stack-groups", "1", "ranks"), cell(app, "stack-groups", "1", "group")) == ("0, 1, 2", "1")
        assert (cell(app, "stack-groups", "2", "ranks"), cell(app, "stack-groups", "2", "group")) == ("3", "2!!")
        assert cell(app, "stack-groups", "2", "signature").startswith("data.py:_next_document < data.py:next_batch")
        assert "_next_document" in stack_text(app)  # the culprit's stacks are shown first


async def test_moving_to_a_rank_in_the_diagnosis_screen_shows_its_full_stacks(
    agents: tuple[list[FakeAgent], list[str]],
) -> None:
    _, addresses = agents
    app = DashboardApp(addresses)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("s")
        await until(pilot, lambda: "_next_document" in stack_text(app), "the culprit's stacks")
        app.screen.query_one("#stack-ranks").focus()
        await pilot.press("up", "up", "up")  # from the culprit, rank 3, to rank 0
        await until(pilot, lambda: "all_reduce" in stack_text(app), "rank 0's stacks")
        assert "queue.py" in stack_text(app)  # every thread, not only the main one
        assert "rank 0 on node0" in str(app.screen.query_one("#stack-scroll").border_title)


async def test_a_hang_event_shows_its_diagnosis_on_the_open_diagnosis_screen(
    agents: tuple[list[FakeAgent], list[str]],
) -> None:
    fakes, addresses = agents
    app = DashboardApp(addresses)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("s")
        await until(pilot, lambda: "culprit" in summary_text(app), "the diagnosis")
        fakes[1].push(telemetry_pb2.Telemetry(events=[hang_event(time.time())]))
        await until(pilot, lambda: "Agent's diagnosis" in summary_text(app), "the hang's diagnosis")
        assert "hang: rank 3 on node1 after step 41, detected in 31.25s; not restarted yet" in summary_text(app)


async def test_control_calls_carry_the_dashboards_token(agents: tuple[list[FakeAgent], list[str]]) -> None:
    fakes, addresses = agents
    app = DashboardApp(addresses, token="s3cret")
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("s")
        await until(pilot, lambda: all(fake.control_calls for fake in fakes), "DumpStacks on both agents")
        assert [call[2].get("authorization") for fake in fakes for call in fake.control_calls] == ["Bearer s3cret"] * 2


async def test_s_in_readonly_collects_no_stacks_and_says_so(agents: tuple[list[FakeAgent], list[str]]) -> None:
    fakes, addresses = agents
    app = DashboardApp(addresses, readonly=True)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("s")
        assert isinstance(app.screen, DiagnosisScreen)
        await until(pilot, lambda: "read-only" in summary_text(app), "the read-only note")
        await pilot.pause(0.3)
        assert [fake.control_calls for fake in fakes] == [[], []]


def test_job_stacks_without_answers_names_each_agents_error() -> None:
    replies = [AgentStacks("10.0.0.1:50051", "node0", None, "UNAVAILABLE: connection refused")]
    stacks = job_stacks(replies, wall_time=0.0)
    assert stacks.rows == () and stacks.culprit is None
    assert stacks.summary() == "no stacks: 10.0.0.1:50051: UNAVAILABLE: connection refused"


def test_job_stacks_groups_ranks_by_stack_and_marks_only_groups_of_one_beside_larger_ones() -> None:
    response = agent_pb2.DumpStacksResponse(
        ranks=[
            rank_stacks(0, ALL_REDUCE, 8),
            rank_stacks(1, ALL_REDUCE, 8),
            rank_stacks(2, DATA_WAIT, 8),
            agent_pb2.RankStacks(rank=3, method="stopped (SIGSTOP)", last_step=41, collectives_issued=8),
        ]
    )
    stacks = job_stacks([AgentStacks("a:1", "node0", response)], wall_time=0.0)
    assert [(g.ranks, g.odd) for g in stacks.groups] == [((0, 1), False), ((2,), True)]
    assert [r.group for r in stacks.rows] == ["1", "1", "2", "-"]
    assert stacks.culprit == 2  # progress is level: the one stack no other rank shares


def test_stacks_of_a_job_that_steps_blame_no_rank_and_mark_no_group() -> None:
    response = agent_pb2.DumpStacksResponse(
        ranks=[rank_stacks(0, ALL_REDUCE, 8), rank_stacks(1, ALL_REDUCE, 8), rank_stacks(2, DATA_WAIT, 8)],
        culprit=2,
        reason="rank 2's stack differs",
    )
    stacks = job_stacks([AgentStacks("a:1", "node0", response)], wall_time=0.0, stalled=False)
    assert stacks.culprit is None and not any(group.odd for group in stacks.groups)
    assert stacks.summary().startswith("no stall: stacks at ")
    assert [group.ranks for group in stacks.groups] == [(0, 1), (2,)]  # still grouped, for the curious


def hang_event(wall_time: float) -> telemetry_pb2.Event:
    detail = telemetry_pb2.HangDetail(
        verdict=telemetry_pb2.HangDetail.VERDICT_CULPRIT, culprit_rank=3, detect_seconds=31.25, last_step=41,
        reason="rank 3 lags: step 41 with 164 collectives",
    )  # fmt: skip
    return make_event(
        "rank 3 hangs", detail, severity=telemetry_pb2.Event.SEVERITY_ERROR, node="node1", rank=3, step=41,
        wall_time=wall_time,
    )  # fmt: skip


@pytest.mark.usefixtures("utc")
async def test_diagnosis_screen_snapshot(tmp_path: Path) -> None:
    model = synthetic_model()
    model.ingest("10.0.0.2:50051", telemetry_pb2.Telemetry(events=[hang_event(model.clock() - 1.0)]))
    app = DashboardApp(model=model)
    node0 = agent_pb2.DumpStacksResponse(ranks=[rank_stacks(0, ALL_REDUCE, 168), rank_stacks(1, ALL_REDUCE, 168)])
    node1 = agent_pb2.DumpStacksResponse(ranks=[rank_stacks(2, ALL_REDUCE, 168), rank_stacks(3, DATA_WAIT, 164)])
    replies = [
        AgentStacks("10.0.0.1:50051", "node0", node0),
        AgentStacks("10.0.0.2:50051", "node1", node1),
        AgentStacks("10.0.0.9:50051", "10.0.0.9:50051", None, "UNAVAILABLE: failed to connect to all addresses"),
    ]
    async with app.run_test(size=SIZE) as pilot:
        screen = DiagnosisScreen()
        await app.push_screen(screen)
        screen.set_stacks(job_stacks(replies, wall_time=model.clock() - 0.5))
        await drawn(app, pilot)
        await pilot.pause(0.2)
        assert_snapshot(app, "diagnosis_screen", tmp_path)


# -- r: restart the job ------------------------------------------------------------------------------------


async def test_r_asks_first_then_restarts_every_agent_from_the_newest_checkpoint(
    agents: tuple[list[FakeAgent], list[str]],
) -> None:
    fakes, addresses = agents
    app = DashboardApp(addresses)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("r")
        assert isinstance(app.screen, ConfirmScreen)
        assert app.screen.question == "Restart the job from checkpoint step 40? y/n"
        assert [fake.control_calls for fake in fakes] == [[], []]  # nothing before the answer
        await pilot.press("y")
        await until(pilot, lambda: all(fake.control_calls for fake in fakes), "Restart on both agents")
        requests = [call[1] for fake in fakes for call in fake.control_calls]
        assert [(type(r), r.step) for r in requests] == [(agent_pb2.RestartRequest, 0)] * 2  # type: ignore[attr-defined]
        await until(pilot, lambda: any("restart requested" in n for n in notifications(app)), "the notification")
        assert "4 ranks stopped on 2 of 2 agents; resuming from step 40" in notifications(app)[-1]
        assert isinstance(app.screen, MainScreen)


async def test_r_then_n_restarts_nothing(agents: tuple[list[FakeAgent], list[str]]) -> None:
    fakes, addresses = agents
    app = DashboardApp(addresses)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("r")
        assert isinstance(app.screen, ConfirmScreen)
        await pilot.press("n")
        assert isinstance(app.screen, MainScreen)
        await pilot.pause(0.3)
        assert [fake.control_calls for fake in fakes] == [[], []]


async def test_r_in_readonly_sends_nothing_and_says_so(agents: tuple[list[FakeAgent], list[str]]) -> None:
    fakes, addresses = agents
    app = DashboardApp(addresses, readonly=True)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("r")
        assert isinstance(app.screen, MainScreen)  # no question: there is nothing to confirm
        assert notifications(app) == ["read-only dashboard (--readonly): no restart was sent"]
        await pilot.pause(0.3)
        assert [fake.control_calls for fake in fakes] == [[], []]


async def test_a_refused_restart_is_shown_naming_the_agent_and_its_message(
    agents: tuple[list[FakeAgent], list[str]],
) -> None:
    fakes, addresses = agents
    fakes[1].refusal = (grpc.StatusCode.FAILED_PRECONDITION, "no training rank is running on this node")
    app = DashboardApp(addresses)
    async with app.run_test(size=SIZE) as pilot:
        await connected(pilot, app)
        await pilot.press("r", "y")
        await until(pilot, lambda: len(notifications(app)) == 2, "two notifications")
        refused = f"{addresses[1]}: restart refused: FAILED_PRECONDITION: no training rank is running on this node"
        assert refused in notifications(app)
        assert "2 ranks stopped on 1 of 2 agents" in " ".join(notifications(app))


def test_the_dashboards_token_defaults_to_megascope_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEGASCOPE_TOKEN", "from-env")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--agents", "127.0.0.1:1"]).token == "from-env"
    assert parser.parse_args(["--agents", "127.0.0.1:1", "--token", "given"]).token == "given"
