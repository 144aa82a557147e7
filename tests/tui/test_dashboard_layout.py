"""The main screen fits the terminal, from 80x24 up, during a fault: the header keeps its vital figures whole, the
rank table leaves out columns by priority, the fault line wraps rather than being cut.

The scripted cluster (``support.tui.fault_model``): rank 3 crashed, the job restarted from step 100, then rank 1
died too and the job is down. Snapshots of it at 80x24, 120x40 and 200x50 are in tests/tui/snapshots/
(regenerate with ``MEGASCOPE_UPDATE_SNAPSHOTS=1`` and read them before committing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from support.tui import assert_snapshot, drawn, fault_model, header_text, rendered_text, rendered_words

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.model.views import HeaderView
from megascope.dashboard.widgets.bars import FaultBar
from megascope.dashboard.widgets.header import KEEP, fit, header_fields
from megascope.dashboard.widgets.tables import EventsTable, NodesTable, RanksTable

SIZES = [(80, 24), (120, 40), (200, 50)]
VITAL_RANK_COLUMNS = ["rank", "status", "step", "age", "step_ms"]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_the_header_keeps_the_down_marker_faults_and_restarts_whole(size: tuple[int, int]) -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=size) as pilot:
        await drawn(app, pilot)
        header = header_text(app)
        assert "CRASH!!" in header  # the job is down: rank 1 died and no restart has come yet
        assert "faults 2!!" in header and "restarts 1!" in header
        assert "step 130/400" in header
        assert all(len(line) <= size[0] for line in header.splitlines())
        # A label is never left without its value ("| restarts" at the edge of the line).
        assert not re.search(r"\| [a-zA-Z/ ]+$", header, re.MULTILINE)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_the_rank_table_keeps_the_vital_columns_and_drops_the_rest_by_priority(size: tuple[int, int]) -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=size) as pilot:
        await drawn(app, pilot)
        table = app.screen.query_one(RanksTable)
        visible = table.visible_columns
        assert set(VITAL_RANK_COLUMNS) <= set(visible)
        dropped = {key for key, _, _ in RanksTable.COLUMNS if key not in visible}
        # What is left out is the start of the drop order: the least important first.
        assert dropped == set(RanksTable.DROP_ORDER[: len(dropped)])
        # Every column shown fits: nothing is drawn past the table's edge.
        assert table.virtual_size.width <= table.size.width
        screen = rendered_text(app)
        assert "FAILED exit 1" in screen


async def test_at_80x24_every_part_of_the_main_screen_shows() -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=(80, 24)) as pilot:
        await drawn(app, pilot)
        for table in (RanksTable, NodesTable, EventsTable):
            widget = app.screen.query_one(table)
            assert widget.region.height >= 4, table.__name__
        assert app.screen.query_one(RanksTable).row_count == 4


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_the_fault_line_wraps_and_is_never_cut(size: tuple[int, int]) -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=size) as pilot:
        await drawn(app, pilot)
        bar = app.screen.query_one(FaultBar)
        whole = bar.text.plain.strip()
        assert whole.endswith("not restarted yet  (job restarts: 1)")
        assert " ".join(whole.split()) in rendered_words(app)


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
async def test_main_screen_during_a_fault_snapshot(size: tuple[int, int], utc: None, tmp_path: Path) -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=size) as pilot:
        await drawn(app, pilot)
        assert_snapshot(app, f"main_fault_{size[0]}x{size[1]}", tmp_path)


# -- the header's fitting, without a terminal --------------------------------------------------------------


def _header(**changes: object) -> HeaderView:
    base: dict[str, object] = dict(
        step=1234, total_steps=5000, tokens_per_second=40354.0, mfu=0.186, loss=2.6407, step_seconds=0.406,
        eta_seconds=61.0, uptime_seconds=105.0, connected_agents=2, total_agents=2, known_ranks=4, world_size=4,
        run_id="demo", stragglers=1, checkpoint="step 1,200, 12s ago", restarts=3,
    )  # fmt: skip
    base.update(changes)
    return HeaderView(**base)  # type: ignore[arg-type]


def test_a_narrow_header_drops_uptime_and_eta_before_anything_vital() -> None:
    fields = header_fields(_header(), faults=3)
    lines = fit(fields, first_line_used=11, width=60, max_lines=2)
    kept = {f.label for line in lines for f in line}
    assert {"step", "faults", "restarts"} <= kept
    assert "up" not in kept and "ETA" not in kept
    assert all(sum(f.width() + 3 for f in line) - 3 <= 60 for line in lines)


def test_fields_that_must_stay_stay_even_when_nothing_else_fits() -> None:
    fields = header_fields(_header(stalled=True, last_step_age=12.0), faults=1)
    lines = fit(fields, first_line_used=11, width=40, max_lines=1)
    assert len(lines) > 1  # they need more than the one line asked for: they get it
    kept = [f for line in lines for f in line]
    assert {f.priority for f in kept} == {KEEP}
    assert [f.value for f in kept if not f.label] == ["STALLED: last step 12s ago"]
