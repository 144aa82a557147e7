"""Training curves: ``g`` opens loss (mean or per rank, ``a``), learning rate, gradient norm and the script's own
scalars; ``e`` changes the EMA smoothing everywhere. Sizes: one formatter, binary units, labelled."""

from __future__ import annotations

import pytest
from support.fake_agent import synthetic_model
from support.tui import cell, drawn, rendered_text, until

from megascope.dashboard import formatting as fmt
from megascope.dashboard.app import DashboardApp
from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.model.views import SMOOTHING_WEIGHTS, ema
from megascope.dashboard.screens.main import MainScreen
from megascope.dashboard.screens.node import NodeScreen
from megascope.dashboard.screens.training import TrainingScreen
from megascope.dashboard.widgets.plot import Plot
from megascope.protos.megascope.v1 import telemetry_pb2

SIZE = (160, 48)


async def test_g_opens_loss_lr_and_grad_norm_plots_and_esc_returns() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=SIZE) as pilot:
        await drawn(app, pilot)
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, TrainingScreen), "the plots screen")
        await drawn(app, pilot)
        text = rendered_text(app)
        for title in ("loss, mean over ranks (EMA 0.6", "learning rate", "gradient norm"):
            assert title in text, title
        assert "0.003" in text  # the synthetic run's constant learning rate is the lr plot's scale
        await pilot.press("escape")
        assert isinstance(app.screen, MainScreen)


async def test_a_draws_every_ranks_loss_curve_with_its_own_glyph() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, TrainingScreen), "the plots screen")
        await pilot.press("a")
        loss = app.screen.query_one("#t-loss", Plot)
        await until(pilot, lambda: "rank 3" in str(loss.border_subtitle), "a legend of four ranks")
        assert loss.border_subtitle == "• rank 0  + rank 1  x rank 2  * rank 3"
        assert {"•", "+", "x", "*"} <= set(rendered_text(app))


async def test_e_steps_the_smoothing_and_the_main_loss_plot_follows() -> None:
    app = DashboardApp(model=synthetic_model())
    async with app.run_test(size=(200, 50)) as pilot:
        await drawn(app, pilot)
        loss = app.screen.query_one("#loss", Plot)
        assert app.smoothing == SMOOTHING_WEIGHTS[1] and "EMA 0.6" in str(loss.border_title)
        await pilot.press("e")
        await until(pilot, lambda: "EMA 0.9" in str(loss.border_title), "EMA 0.9 on the main screen")
        await pilot.press("e", "e")
        await until(pilot, lambda: loss.border_title == "Loss (mean)", "raw after 0.99")


async def test_the_scripts_own_scalars_get_plots_of_their_own() -> None:
    model = ClusterModel(clock=lambda: 1000.0)
    model.add_agent("10.0.0.1:50051")
    reports = [
        telemetry_pb2.StepReport(
            rank=0,
            step=step,
            loss=3.0 - 0.01 * step,
            lr=1e-3,
            grad_norm=1.0,
            step_seconds=0.1,
            wall_time=900.0 + step,
            scalars={"accuracy": 0.5 + 0.001 * step, "router_z_loss": 0.01},
        )  # fmt: skip
        for step in range(1, 60)
    ]
    model.ingest("10.0.0.1:50051", telemetry_pb2.Telemetry(step_reports=reports))
    model.set_connected("10.0.0.1:50051")
    app = DashboardApp(model=model)
    async with app.run_test(size=SIZE) as pilot:
        await pilot.press("g")
        await until(pilot, lambda: isinstance(app.screen, TrainingScreen), "the plots screen")
        await drawn(app, pilot)
        titles = [str(p.border_title) for p in app.screen.query(".scalar").results(Plot) if p.display]
        assert titles == ["accuracy (EMA 0.6)", "router_z_loss (EMA 0.6)"]


def test_ema_is_debiased_so_a_flat_curve_stays_flat() -> None:
    flat = ema([(1, 2.0), (2, 2.0), (3, 2.0)], 0.9)
    assert [step for step, _ in flat] == [1, 2, 3] and [value for _, value in flat] == pytest.approx([2.0] * 3)
    assert ema([(1, 1.0), (2, 3.0)], 0.0) == [(1, 1.0), (2, 3.0)]
    smoothed = ema([(s, float(s % 2)) for s in range(100)], 0.9)
    assert max(v for _, v in smoothed[50:]) < 0.7  # the zigzag is smoothed towards its mean


# -- one size formatter ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_bytes", "text"),
    [(512, "512 B"), (1536, "1.5 KiB"), (5.35e9, "4.98 GiB"), (24 * 2**30, "24 GiB"), (1023.9 * 2**20, "1 GiB")],
)
def test_sizes_are_binary_and_labelled(num_bytes: float, text: str) -> None:
    assert fmt.size(num_bytes) == text


def test_a_used_of_total_pair_names_the_unit_once_when_both_share_it() -> None:
    assert fmt.size_pair(6.7 * 2**30, 24 * 2**30) == "6.7 / 24 GiB"
    assert fmt.size_pair(500e6, 24 * 2**30) == "477 MiB / 24 GiB"


async def test_the_nodes_table_and_the_node_screen_say_gib_alike() -> None:
    app = DashboardApp(model=synthetic_model(gpus=2))
    async with app.run_test(size=(200, 50)) as pilot:
        await drawn(app, pilot)
        memory = cell(app, "nodes", "10.0.0.1:50051", "memory")
        assert memory.endswith(" GiB") and "G/" not in memory
        assert cell(app, "nodes", "10.0.0.1:50051", "gpu_memory") == "123 / 160 GiB"
        app.screen.query_one("#nodes").focus()
        await pilot.press("enter")
        await until(pilot, lambda: isinstance(app.screen, NodeScreen), "the node screen")
        await drawn(app, pilot)
        assert "123 GiB of 160 GiB" in rendered_text(app)
