"""Helpers for the TUI tests: Pilot waits, table cells and SVG snapshots."""

from __future__ import annotations

import difflib
import html
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.tables import KeyedTable
from megascope.protos.events import make_event
from megascope.protos.megascope.v1 import telemetry_pb2
from support.fake_agent import SyntheticNode

SNAPSHOTS = Path(__file__).resolve().parents[1] / "tui" / "snapshots"


SIZE = (160, 48)


async def until(pilot: Pilot[int], condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        await pilot.pause(0.05)


def cell(app: DashboardApp, table_id: str, row: str, column: str) -> str:
    table = app.screen.query_one(f"#{table_id}", KeyedTable)
    if row not in table.rows:
        return ""
    return table.get_cell(row, column).plain.strip()


def header_text(app: DashboardApp) -> str:
    return app.screen.query_one(HeaderBar).text.plain


def rendered_text(app: DashboardApp) -> str:
    """The screen's text, from its SVG screenshot."""
    svg = app.export_screenshot()
    return "\n".join(svg_lines(svg))


def rendered_words(app: DashboardApp) -> str:
    """The screen's words, borders left out, one space apart: text wrapped over lines reads as one sentence."""
    return " ".join(re.sub(r"[│╭╮╰╯─▏▕]", " ", rendered_text(app)).split())


def svg_lines(svg: str) -> list[str]:
    """Text of an SVG screenshot, one string per screen line, each piece at its column (for readable snapshot
    diffs and for asserting on what a person sees: runs of blank cells are drawn as rectangles, not text)."""
    lines: dict[float, dict[int, str]] = {}
    for attributes, content in re.findall(r"<text ([^>]*)>([^<]*)</text>", svg):
        y, x = re.search(r'\by="([\d.]+)"', attributes), re.search(r'\bx="([\d.]+)"', attributes)
        if y is None or x is None or "-title" in attributes:  # the window's title, not the screen
            continue
        lines.setdefault(float(y.group(1)), {})[round(float(x.group(1)) / _CELL_WIDTH)] = html.unescape(content)
    out = []
    for _, pieces in sorted(lines.items()):
        line = ""
        for column, text in sorted(pieces.items()):
            line = line.ljust(column) + text.replace("\xa0", " ")
        out.append(line.rstrip())
    return out


_CELL_WIDTH = 12.2
"""Width of one terminal cell in Textual's SVG screenshots (0.61 of its 20-pixel font)."""


async def drawn(app: DashboardApp, pilot: object) -> None:
    """Wait until the top screen has drawn a frame of the model (a loaded machine can take several ticks)."""
    for _ in range(200):
        if getattr(app.screen, "frames_drawn", 1) >= 1:
            break
        await pilot.pause(0.05)  # type: ignore[attr-defined]
    await pilot.pause()  # type: ignore[attr-defined]


def assert_snapshot(app: DashboardApp, name: str, tmp_path: Path) -> None:
    svg = app.export_screenshot()
    path = SNAPSHOTS / f"{name}.svg"
    if os.environ.get("MEGASCOPE_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(svg)
        return
    if not path.exists():
        pytest.fail(f"no snapshot {path}; create it with MEGASCOPE_UPDATE_SNAPSHOTS=1")
    expected = path.read_text()
    if svg != expected:
        actual = tmp_path / f"{name}.svg"
        actual.write_text(svg)
        diff = "\n".join(difflib.unified_diff(svg_lines(expected), svg_lines(svg), "snapshot", "now", n=0, lineterm=""))
        pytest.fail(f"{name} differs from {path} (now: {actual}); screen text diff:\n{diff or '(styles only)'}")


# -- a scripted cluster during a fault -------------------------------------------------------------------------


def fault_model(*, second_crash: bool = True) -> ClusterModel:
    """Two nodes of two ranks (rank 3 a straggler) that trained 120 steps, crashed (rank 3, SIGKILL), restarted from
    step 100 and trained on to step 130; with ``second_crash`` rank 1 has just died too, with no restart yet.

    Deterministic (synthetic data, fixed clock): the layout tests and snapshots at 80x24 .. 200x50 draw it.
    """
    sims = [
        SyntheticNode(
            node=f"node{n}",
            ranks=[2 * n, 2 * n + 1],
            world_size=4,
            agent_address=f"10.0.0.{n + 1}:50051",
            gpus=2,
            total_steps=400,
            slow_rank=3,
            seed=n,
        )  # fmt: skip
        for n in range(2)
    ]
    now = [sims[0].start_wall_time + 2.0]
    model = ClusterModel(clock=lambda: now[0])
    for sim in sims:
        model.add_agent(sim.agent_address)
        first = sim.started()
        first.node_info.CopyFrom(sim.node_info())
        model.ingest(sim.agent_address, first)
        model.set_connected(sim.agent_address)
    for sim in sims:
        batch = sim.advance(120)
        batch.rank_statuses.extend(sim.rank_statuses())
        now[0] = sim.now  # the model's clock follows the batches: their steps arrive as they are done
        model.ingest(sim.agent_address, batch)
    crashed_at = sims[1].now + 0.5
    crash = make_event(
        "rank 3 (pid 5003) died of SIGKILL after step 120; stopping every rank for a restart",
        telemetry_pb2.CrashDetail(signal="SIGKILL", detect_seconds=0.42, last_step=120),
        severity=ERROR, node="node1", rank=3, step=120, wall_time=crashed_at,
    )  # fmt: skip
    failed = telemetry_pb2.RankStatus(rank=3, pid=5003, state=telemetry_pb2.RANK_STATE_FAILED, exit_reason="SIGKILL")
    now[0] = crashed_at
    model.ingest(sims[1].agent_address, telemetry_pb2.Telemetry(events=[crash], rank_statuses=[failed]))
    for sim in sims:
        sim.step, sim.now = 100, crashed_at + 12.0  # resumed from the checkpoint of step 100
    restart = make_event(
        "job restarted after the crash of rank 3: resumed from step 100, MTTR 15.2s, 20 steps lost",
        telemetry_pb2.RestartDetail(
            cause=telemetry_pb2.RestartDetail.CAUSE_CRASH, phase=telemetry_pb2.RestartDetail.PHASE_DONE,
            mttr_seconds=15.25, steps_lost=20, resumed_step=100,
        ),
        severity=WARNING, node="node0", rank=0, step=100, wall_time=crashed_at + 15.25,
    )  # fmt: skip
    now[0] = crashed_at + 15.25
    model.ingest(sims[0].agent_address, telemetry_pb2.Telemetry(events=[restart]))
    for sim in sims:
        batch = sim.advance(30)
        for report in batch.step_reports:
            report.restart_count = 1
        batch.rank_statuses.extend(sim.rank_statuses())
        now[0] = sim.now
        model.ingest(sim.agent_address, batch)
    if second_crash:
        again = make_event(
            "rank 1 (pid 5001) exited with code 1 after step 130; stopping every rank for a restart",
            telemetry_pb2.CrashDetail(exit_code=1, detect_seconds=0.31, last_step=130),
            severity=ERROR, node="node0", rank=1, step=130, wall_time=sims[0].now + 0.3,
        )  # fmt: skip
        dead = telemetry_pb2.RankStatus(rank=1, pid=5001, state=telemetry_pb2.RANK_STATE_FAILED, exit_reason="exit 1")
        model.ingest(sims[0].agent_address, telemetry_pb2.Telemetry(events=[again], rank_statuses=[dead]))
    now[0] = max(sim.now for sim in sims) + 1.0
    return model


ERROR = telemetry_pb2.Event.SEVERITY_ERROR
WARNING = telemetry_pb2.Event.SEVERITY_WARNING
