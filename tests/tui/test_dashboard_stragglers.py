"""Stragglers in the dashboard: the cluster model feeding the rules, the flags on the rank rows and in the event
log, the heat map and timeline screens (Pilot) and ``megascope status --json``. The demo end to end with an
injected slow rank is in tests/integration/test_demo_stragglers.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from rich.console import Console
from rich.text import Text
from support.fake_agent import SyntheticNode, synthetic_model
from support.tui import SIZE, cell, rendered_text, until
from textual.widgets import Static

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.headless import summarize
from megascope.dashboard.model.cluster import PENDING_SECONDS, ClusterModel
from megascope.dashboard.model.stragglers import DEFAULT_CONFIG, Cause
from megascope.dashboard.screens.heat_map import HeatMapScreen
from megascope.dashboard.screens.help import HelpScreen
from megascope.dashboard.screens.main import RANK_ROWS_SHOWN, MainScreen
from megascope.dashboard.screens.timeline import RankTimelineScreen
from megascope.dashboard.status_cli import render_text, snapshot_dict
from megascope.dashboard.widgets.bars import StragglerBar
from megascope.dashboard.widgets.tables import KeyedTable

# -- the cluster model ---------------------------------------------------------------------------------------


def two_nodes(slow_rank: int | None = 3) -> tuple[ClusterModel, list[SyntheticNode], list[float]]:
    """A model over two synthetic nodes of two ranks each (clock under the test's control), nothing run yet."""
    sims = [
        SyntheticNode(
            node=f"node{n}",
            ranks=[2 * n, 2 * n + 1],
            world_size=4,
            agent_address=f"10.0.0.{n + 1}:50051",
            slow_rank=slow_rank,
            seed=n,
        )  # fmt: skip
        for n in range(2)
    ]
    now = [sims[0].start_wall_time]
    model = ClusterModel(clock=lambda: now[0])
    for sim in sims:
        first = sim.started()
        first.node_info.CopyFrom(sim.node_info())
        model.ingest(sim.agent_address, first)
        model.set_connected(sim.agent_address)
    return model, sims, now


def run(model: ClusterModel, sims: list[SyntheticNode], steps: int) -> None:
    for sim in sims:
        model.ingest(sim.agent_address, sim.advance(steps))


def straggler_events(model: ClusterModel, kind: str = "straggler") -> list[tuple[int | None, int | None]]:
    return [(e.rank, e.step) for e in model.events() if e.kind == kind]


def test_a_straggler_becomes_an_event_with_its_rank_and_marks_its_rank_row() -> None:
    model = synthetic_model()
    [(rank, step)] = straggler_events(model)
    assert rank == 3 and step is not None and step <= 15
    rows = {row.rank: row for row in model.rank_rows()}
    assert rows[3].straggler is not None and rows[3].straggler.cause is Cause.DEVICE
    assert all(rows[r].straggler is None for r in (0, 1, 2))
    assert model.header().stragglers == 1
    [event] = [e for e in model.events() if e.kind == "straggler"]
    assert event.severity == "WARN" and "rank 3 on node1 is a straggler" in event.text


def test_a_step_is_judged_once_every_node_has_reported_it() -> None:
    # node0's whole history arrives before node1's (as a late dashboard's back-fill can): no step may be judged
    # on node0's ranks alone, or the detector would never see rank 3.
    model, sims, _ = two_nodes()
    run(model, sims[:1], 40)
    assert model.heat_map(100).steps == []
    run(model, sims[1:], 40)
    heat = model.heat_map(100)
    assert heat.ranks == [0, 1, 2, 3] and heat.steps[0] <= 5 and heat.steps[-1] == 40
    assert [flag.rank for flag in model.straggler_flags()] == [3]


def test_a_rank_that_vanished_does_not_stall_the_others() -> None:
    model, sims, now = two_nodes(slow_rank=None)
    run(model, sims, 10)
    sims[1].ranks = [2]  # rank 3 stops reporting
    for _ in range(5):
        now[0] += 0.5 * PENDING_SECONDS / 5
        run(model, sims, 1)
    assert model.heat_map(100).steps[-1] == 10  # waiting for rank 3 ...
    now[0] += PENDING_SECONDS
    run(model, sims, 1)
    assert model.heat_map(100).steps[-1] == 16  # ... until it has been silent too long


def test_the_flag_clears_with_an_event_when_the_slowdown_ends() -> None:
    model, sims, _ = two_nodes()
    run(model, sims, 30)
    for sim in sims:
        sim.slow_rank = None
    run(model, sims, 30)
    [(rank, step)] = straggler_events(model, "straggler_cleared")
    assert rank == 3 and step is not None and 30 < step <= 30 + DEFAULT_CONFIG.window + DEFAULT_CONFIG.grace
    assert model.straggler_flags(active_only=True) == []
    assert [(flag.rank, flag.cleared_reason) for flag in model.straggler_flags()] == [(3, "recovered")]


def test_no_straggler_no_flag() -> None:
    model, sims, _ = two_nodes(slow_rank=None)
    run(model, sims, 200)
    assert model.straggler_flags() == [] and straggler_events(model) == []


def test_a_rank_timeline_sits_beside_the_median_rank() -> None:
    model = synthetic_model()
    timeline = model.rank_timeline(3, 5)
    assert timeline is not None and timeline.node == "node1" and timeline.steps == [246, 247, 248, 249, 250]
    assert timeline.straggler is not None
    for mine, median in zip(timeline.rank_phases, timeline.median_phases, strict=True):
        assert mine is not None
        assert mine.backward > 1.2 * median.backward  # it computes longer ...
        assert mine.comm < 0.5 * median.comm  # ... and waits less: the others wait for it
        assert mine.total == pytest.approx(median.total, rel=0.02)  # in a synchronous job the steps are equal
    assert model.rank_timeline(99, 5) is None


# -- status and the headless summary -------------------------------------------------------------------------


def test_status_json_includes_the_flags() -> None:
    snapshot = json.loads(json.dumps(snapshot_dict(synthetic_model()), allow_nan=False))
    [flag] = snapshot["stragglers"]
    assert (flag["rank"], flag["node"], flag["cause"], flag["active"]) == (3, "node1", "compute", True)
    assert flag["cost_seconds"] > 0 and flag["since_step"] <= flag["flagged_step"]
    assert snapshot["ranks"][3]["straggler"]["rank"] == 3 and snapshot["ranks"][0]["straggler"] is None


def test_status_text_lists_the_stragglers() -> None:
    text = render_text(synthetic_model())
    assert "stragglers: 1" in text and "rank 3 on node1 is a straggler" in text
    rank3 = next(line for line in text.splitlines() if line.startswith("3 "))
    assert rank3.rstrip().endswith("SLOW compute")


def test_the_headless_summary_lists_every_flagged_rank_and_its_event() -> None:
    model, sims, _ = two_nodes()
    run(model, sims, 30)
    for sim in sims:
        sim.slow_rank = None
    run(model, sims, 30)  # cleared by the end: still listed, it was flagged during the run
    cluster = SimpleNamespace(nodes=2, run_dir=Path("runs/x"))
    summary = summarize(model, cluster, None, [0, 0])  # type: ignore[arg-type]
    assert summary["stragglers"] == [3]
    assert [(f["rank"], f["cause"], f["cleared_step"] is not None) for f in summary["straggler_flags"]] == [
        (3, "compute", True)
    ]
    assert [e["rank"] for e in summary["events"] if e["kind"] == "straggler"] == [3]
    json.dumps(summary)


# -- the TUI -------------------------------------------------------------------------------------------------


def static_text(app: DashboardApp, selector: str) -> str:
    """The plain text a Static shows (wide enough that nothing wraps)."""
    renderable = app.screen.query_one(selector, Static).content
    if isinstance(renderable, Text):
        return renderable.plain
    console = Console(width=400, record=True)
    console.print(renderable)
    return console.export_text()


async def test_the_main_screen_marks_the_straggler_in_words() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        assert cell(app, "ranks", "3", "status") == "SLOW compute"
        assert cell(app, "ranks", "2", "status") == "RUNNING"
        bar = app.screen.query_one(StragglerBar)
        assert bar.display and "STRAGGLER! rank 3 on node1" in bar.text.plain
        assert "stragglers 1!" in rendered_text(app)


async def test_h_opens_the_heat_map_grouped_by_node_and_esc_closes_it() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, HeatMapScreen), "the heat map")
        await pilot.pause()
        lines = rendered_text(app).splitlines()
        nodes = [line for line in lines if "── node" in line]
        assert "── node0: 2 ranks ─" in nodes[0] and "── node1: 2 ranks, 1 flagged! ─" in nodes[1]
        rank3 = next(line for line in lines if line.startswith("│     3 "))
        assert "SLOW compute!" in rank3 and "#####" in rank3  # >= 1.25x: red and '#'
        rank0 = next(line for line in lines if line.startswith("│     0 "))
        assert "·····" in rank0 and "#" not in rank0
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_enter_on_a_rank_in_the_heat_map_opens_its_timeline_beside_the_median() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("h")
        await until(pilot, lambda: isinstance(app.screen, HeatMapScreen), "the heat map")
        await pilot.press("end", "enter")  # the last rank: 3
        await until(pilot, lambda: isinstance(app.screen, RankTimelineScreen), "the timeline")
        screen = app.screen
        assert isinstance(screen, RankTimelineScreen) and screen.rank == 3
        await until(pilot, lambda: "B" in static_text(app, "#timeline-median"), "bars drawn")
        mine, median = static_text(app, "#timeline-rank"), static_text(app, "#timeline-median")
        assert mine.count("B") > 1.2 * median.count("B")  # longer compute ...
        assert mine.count("W") < median.count("W")  # ... less waiting than the median rank
        assert "250" in mine.splitlines()[-1] and "250" in median.splitlines()[-1]  # the same steps, newest last
        assert "rank 3 on node1 is a straggler" in static_text(app, "#timeline-summary")
        await pilot.press("escape")
        assert isinstance(app.screen, HeatMapScreen)


async def test_a_large_job_lists_its_flagged_ranks_first_in_a_capped_rank_table() -> None:
    world = 5 * 64
    sims = [
        SyntheticNode(node=f"node{n}", ranks=list(range(64 * n, 64 * (n + 1))), world_size=world,
                      agent_address=f"10.0.0.{n}:50051", slow_rank=world - 1, seed=n)
        for n in range(5)
    ]  # fmt: skip
    # All agents known from the start, as the app knows them: a step waits until every one has spoken.
    model = ClusterModel([sim.agent_address for sim in sims], clock=lambda: sims[0].start_wall_time + 60)
    for sim in sims:
        batch = sim.advance(20)
        batch.node_info.CopyFrom(sim.node_info())
        batch.rank_statuses.extend(sim.rank_statuses())
        model.ingest(sim.agent_address, batch)
        model.set_connected(sim.agent_address)
    app = DashboardApp(model=model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.pause()
        table = app.screen.query_one("#ranks", KeyedTable)
        assert table.row_count == RANK_ROWS_SHOWN
        assert table.selected_key() == str(world - 1)  # the straggler tops the table
        assert f"{RANK_ROWS_SHOWN} of {world}" in str(table.border_title)


async def test_help_lists_the_heat_map_key_and_the_straggler_tunables() -> None:
    app = DashboardApp(model=ClusterModel())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        text = static_text(app, "#help-text")
        assert "straggler heat map" in text
        assert "threshold" in text and f"{DEFAULT_CONFIG.threshold:g}x" in text
        assert "window" in text and f"{DEFAULT_CONFIG.window} steps" in text
        assert "SLOW" in text  # the rank status it shows, with its colour
