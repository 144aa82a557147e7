"""``/`` filters the ranks, nodes and events at once (by text, status, severity); any table sorts by any column
(``o`` picks the next column, ``O`` reverses, a click on a header sorts by it)."""

from __future__ import annotations

from support.fake_agent import synthetic_model
from support.tui import drawn, fault_model, until
from textual.widgets import Input

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.widgets.filtering import parse_filter, row_matches, sort_rows
from megascope.dashboard.widgets.tables import EventsTable, KeyedTable, NodesTable, RanksTable

SIZE = (160, 48)


def _keys(table: KeyedTable) -> list[str]:
    return table.shown_keys


def _column(table: KeyedTable, column: str) -> list[str]:
    return [table.get_cell(key, column).plain.strip() for key in _keys(table)]


# -- the filter --------------------------------------------------------------------------------------------


async def test_slash_then_a_status_word_keeps_only_the_ranks_in_that_state() -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=SIZE) as pilot:
        await drawn(app, pilot)
        await pilot.press("slash")
        assert isinstance(app.focused, Input)
        await pilot.press(*"status:failed")
        ranks = app.screen.query_one(RanksTable)
        await until(pilot, lambda: ranks.row_count == 1, "one rank left")
        assert _keys(ranks) == ["1"]
        assert ranks.border_subtitle == "filter 'status:failed': 1 of 4"


async def test_a_severity_filters_the_events_and_esc_clears_the_filter() -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=SIZE) as pilot:
        await drawn(app, pilot)
        events = app.screen.query_one(EventsTable)
        everything = events.row_count
        await pilot.press("slash", *"sev:error", "enter")
        await until(pilot, lambda: events.row_count == 2, "the two crash events")
        assert set(_column(events, "kind")) == {"crash"}
        assert app.screen.query_one("#filter", Input).display  # still shown: the filter is on
        await pilot.press("escape")
        await until(pilot, lambda: events.row_count == everything, "every event again")
        assert not app.screen.query_one("#filter", Input).display


async def test_plain_text_matches_any_column_of_every_table_even_hidden_ones() -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=(80, 24)) as pilot:
        await drawn(app, pilot)
        ranks = app.screen.query_one(RanksTable)
        assert "node" not in ranks.visible_columns  # 80 columns: the node column is left out ...
        await pilot.press("slash", *"node1")
        await until(pilot, lambda: ranks.row_count == 2, "node1's two ranks")  # ... and still filters
        assert _keys(ranks) == ["2", "3"]
        assert _keys(app.screen.query_one(NodesTable)) == ["10.0.0.2:50051"]


def test_filter_words_all_match_a_column_word_matches_that_column_and_a_minus_excludes() -> None:
    row = {"rank": "13", "status": "RUNNING", "node": "node1"}
    assert row_matches(row, parse_filter("node1 running"))
    assert not row_matches(row, parse_filter("rank:3"))  # numbers compare whole
    assert row_matches(row, parse_filter("rank:13"))
    assert not row_matches(row, parse_filter("-running"))
    assert not row_matches(row, parse_filter("severity:error"))  # not a column here
    assert row_matches(row, parse_filter("state:run"), {"state": "status"})


# -- the sort ----------------------------------------------------------------------------------------------


async def test_o_sorts_the_focused_table_by_its_next_column_and_shift_o_reverses() -> None:
    app = DashboardApp(model=synthetic_model(nodes=2, ranks_per_node=3))
    async with app.run_test(size=SIZE) as pilot:
        await drawn(app, pilot)
        ranks = app.screen.query_one(RanksTable)
        ranks.focus()
        await pilot.press("o")  # by rank
        assert ranks.sort_column == "rank" and _keys(ranks) == ["0", "1", "2", "3", "4", "5"]
        await pilot.press("O")
        assert _keys(ranks) == ["5", "4", "3", "2", "1", "0"]
        assert ranks.border_subtitle == "sorted by rank ▼"


async def test_clicking_a_header_sorts_by_it_and_a_second_click_reverses() -> None:
    app = DashboardApp(model=synthetic_model(nodes=2, ranks_per_node=3))
    async with app.run_test(size=SIZE) as pilot:
        await drawn(app, pilot)
        ranks = app.screen.query_one(RanksTable)
        x = ranks.column_x("loss")
        assert x is not None
        header = (x + 2, 1)  # inside the table's border, on its header line
        await pilot.click(RanksTable, offset=header)
        await until(pilot, lambda: ranks.sort_column == "loss", "sorted by loss")
        ascending = _column(ranks, "loss")
        assert ascending == sorted(ascending, key=float) and len(set(ascending)) > 1
        await pilot.click(RanksTable, offset=header)
        await until(pilot, lambda: ranks.sort_descending, "reversed")
        assert _column(ranks, "loss") == ascending[::-1]


def test_numbers_sort_by_value_and_empty_cells_go_last_either_way() -> None:
    rows = [("a", {"v": "1,200"}), ("b", {"v": "-"}), ("c", {"v": "26.0%!"}), ("d", {"v": "3"})]
    assert sort_rows(rows, "v", descending=False) == ["d", "c", "a", "b"]
    assert sort_rows(rows, "v", descending=True) == ["a", "c", "d", "b"]
