"""``enter`` on an event opens it whole, with every attribute of its typed detail; ``esc`` closes it."""

from __future__ import annotations

from support.tui import drawn, fault_model, rendered_text, rendered_words, until

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.screens.event_detail import EventDetailScreen, event_detail_lines
from megascope.dashboard.screens.main import MainScreen
from megascope.dashboard.widgets.tables import EventsTable


async def _open_event(app: DashboardApp, pilot: object, kind: str) -> EventDetailScreen:
    events = app.screen.query_one(EventsTable)
    events.focus()
    row = next(i for i, key in enumerate(events.shown_keys) if events.get_cell(key, "kind").plain.strip() == kind)
    events.move_cursor(row=row, animate=False)
    await pilot.press("enter")  # type: ignore[attr-defined]
    await until(pilot, lambda: isinstance(app.screen, EventDetailScreen), "the event's screen")  # type: ignore[arg-type]
    assert isinstance(app.screen, EventDetailScreen)
    return app.screen


async def test_enter_on_a_cut_event_shows_its_whole_text_and_esc_closes_it() -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=(80, 24)) as pilot:
        await drawn(app, pilot)
        await _open_event(app, pilot, "restart")
        screen = rendered_words(app)
        # At 80 columns the log cuts this text; here all of it reads, wrapped.
        assert "job restarted after the crash of rank 3: resumed from step 100, MTTR 15.2s, 20 steps lost" in screen
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_the_event_screen_lists_every_attribute_of_the_typed_detail() -> None:
    app = DashboardApp(model=fault_model())
    async with app.run_test(size=(120, 40)) as pilot:
        await drawn(app, pilot)
        detail = await _open_event(app, pilot, "restart")
        names = dict(event_detail_lines(detail.event))
        assert detail.event.detail  # the restart's typed detail came through
        for name, value in detail.event.detail.items():
            assert names[name] == str(value)
        assert {"time", "node", "severity", "kind", "rank", "step", "text"} <= set(names)
        screen = rendered_text(app)
        for name in ("mttr_seconds", "steps_lost", "resumed_step", "cause", "phase"):
            assert name in screen, name


def test_nested_and_repeated_detail_fields_are_flattened_to_named_lines() -> None:
    from megascope.dashboard.model.views import EventRow

    event = EventRow(
        id=1, wall_time=0.0, node="node0", severity="WARN", kind="self_check", rank=None, step=None, text="t",
        detail={"checks": [{"name": "matmul", "ok": True}, {"name": "allreduce", "ok": False}], "slow": [1, 3]},
    )  # fmt: skip
    lines = dict(event_detail_lines(event))
    assert lines["checks[1].name"] == "allreduce" and lines["checks[1].ok"] == "False"
    assert lines["slow"] == "1, 3"
