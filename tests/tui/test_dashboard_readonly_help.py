"""A ``--readonly`` dashboard offers no control in its footer; help fits the terminal; under help (or any modal)
the screen behind keeps updating, or says PAUSED."""

from __future__ import annotations

from support.fake_agent import synthetic_model
from support.tui import drawn, fault_model, rendered_text, until
from textual.widgets import Footer

from megascope.dashboard.app import DashboardApp, help_keys
from megascope.dashboard.screens.checkpoints import CheckpointsScreen
from megascope.dashboard.screens.help import HelpScreen
from megascope.dashboard.screens.main import MainScreen
from megascope.dashboard.widgets.header import HeaderBar


def _footer_keys(app: DashboardApp) -> dict[str, str]:
    """The footer's offers: key -> description, as the footer draws them."""
    footer = app.screen.query_one(Footer)
    return {
        binding.key: binding.description
        for (_, binding, enabled, _) in footer.screen.active_bindings.values()
        if binding.show and enabled
    }


async def test_readonly_footer_offers_no_restart_and_r_still_says_why() -> None:
    app = DashboardApp(model=synthetic_model(), readonly=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await drawn(app, pilot)
        offers = _footer_keys(app)
        assert "r" not in offers and "Restart" not in rendered_text(app)
        assert {"q", "p", "s", "h", "g", "c"} <= set(offers)
        await pilot.press("r")
        await until(pilot, lambda: bool(app._notifications), "a notification")
        assert [n.message for n in app._notifications] == ["read-only dashboard (--readonly): no restart was sent"]


async def test_a_dashboard_that_may_act_offers_restart() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=(120, 40)) as pilot:
        await drawn(app, pilot)
        assert _footer_keys(app)["r"] == "Restart"


async def test_readonly_checkpoints_footer_offers_no_merge_or_cancel() -> None:
    app = DashboardApp(model=synthetic_model(), readonly=True)
    async with app.run_test(size=(120, 40)) as pilot:
        await drawn(app, pilot)
        await pilot.press("c")
        await until(pilot, lambda: isinstance(app.screen, CheckpointsScreen), "the checkpoints screen")
        offers = _footer_keys(app)
        assert "m" not in offers and "x" not in offers
        assert "Merge" not in rendered_text(app).splitlines()[-1]


async def test_help_is_never_taller_than_the_terminal_and_scrolls_to_its_end() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=(80, 24)) as pilot:
        await drawn(app, pilot)
        await pilot.press("question_mark")
        assert isinstance(app.screen, HelpScreen)
        await pilot.pause()
        box = app.screen.query_one("#help-box")
        assert box.region.height <= 24 and box.region.y >= 0
        assert "esc, ? or F1 closes this help" in rendered_text(app)  # the way out always shows
        seen = rendered_text(app)
        for _ in range(10):
            await pilot.press("pagedown")
            await pilot.pause()
            seen += rendered_text(app)
        assert "red >= 1.25x" in seen  # the thresholds, far below the fold, are reached by scrolling
        assert "It clears when the slowdown ends." in seen  # and so is the very end


async def test_help_lists_every_key() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=(200, 50)) as pilot:
        await pilot.press("question_mark")
        await pilot.pause()
        help_text = rendered_text(app)
        for row in help_keys():
            assert row.keys in help_text, row.keys
        for key in ("/", "o", "O", "g", "e", "a"):
            assert any(row.keys.split(" / ")[0] == key or key in row.keys.split(" / ") for row in help_keys()), key


async def test_under_help_the_header_keeps_updating() -> None:
    model = fault_model(second_crash=False)
    app = DashboardApp(model=model)
    async with app.run_test(size=(200, 50)) as pilot:
        await drawn(app, pilot)
        await pilot.press("question_mark")
        main = app.screen_stack[-2]
        assert isinstance(main, MainScreen)
        before = main.frames_drawn
        await until(pilot, lambda: main.frames_drawn > before + 1, "frames drawn behind help")
        assert "PAUSED" not in main.query_one(HeaderBar).text.plain


async def test_p_under_help_pauses_and_the_header_behind_says_paused() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=(200, 50)) as pilot:
        await drawn(app, pilot)
        await pilot.press("question_mark", "p")
        main = app.screen_stack[-2]
        assert isinstance(app.screen, HelpScreen) and app.paused
        assert "PAUSED" in main.query_one(HeaderBar).text.plain
        frames = main.frames_drawn
        await pilot.pause(0.5)  # more than one redraw tick
        assert main.frames_drawn == frames
