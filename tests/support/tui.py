"""Helpers for the TUI tests: Pilot waits, table cells and SVG snapshots."""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from textual.pilot import Pilot

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.widgets.header import HeaderBar
from megascope.dashboard.widgets.tables import KeyedTable

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


def svg_lines(svg: str) -> list[str]:
    """Text of an SVG screenshot, one string per screen line (for readable snapshot diffs)."""
    lines: dict[str, list[str]] = {}
    for y, content in re.findall(r'<text [^>]*y="([\d.]+)"[^>]*>([^<]*)</text>', svg):
        lines.setdefault(y, []).append(content.replace("&#160;", " ").replace("&amp;", "&").replace("&gt;", ">"))
    return ["".join(parts) for _, parts in sorted(lines.items(), key=lambda item: float(item[0]))]


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
