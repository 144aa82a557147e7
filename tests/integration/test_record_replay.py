"""Record and replay end to end: a real two-node demo with an injected crash and hang records itself; the replay,
the export and the report read that record back (issue 16).

One demo (about 80 s on 2 cores) is shared by the tests of this module.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from support import REPO, run_megascope
from support.tui import SIZE, until

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.replay import Replay
from megascope.dashboard.screens.diagnosis import DiagnosisScreen
from megascope.engine.runtime import run_dir as run_paths
from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2
from megascope.protos.recording import Part, RecordReader

CRASH = "crash:rank=3,step=15"
HANG = "hang:rank=2,step=35"


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, Any]]]:
    """The run directory of a finished demo (2 nodes x 2 ranks, 60 steps, a crash of rank 3 and a hang of rank 2),
    and the summary the live dashboard printed."""
    run_dir = tmp_path_factory.mktemp("recorded") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "megascope.agent.cli", "demo", "--headless", "--json", "--run-dir", str(run_dir),
         "--steps", "60", "--ckpt-every", "10", "--hang-timeout", "6", "--inject", CRASH, "--inject", HANG],
        capture_output=True, text=True, cwd=REPO, timeout=400, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert [f["kind"] for f in summary["faults"]] == ["crash", "hang"], summary["faults"]
    yield run_dir, summary


def _recorded(run_dir: Path, part: Part) -> list[Any]:
    messages = []
    for path in run_paths.record_files(run_dir):
        with RecordReader(path) as reader:
            messages += [m for _, m in reader.messages(part)]
            assert reader.damage is None
    return messages


def test_every_node_records_its_steps_events_and_the_hangs_stacks(demo: tuple[Path, dict[str, Any]]) -> None:
    run_dir, summary = demo
    assert [p.name for p in run_paths.record_files(run_dir)] == ["node0.sqlite", "node1.sqlite"]
    steps = _recorded(run_dir, Part.STEP)
    assert {r.rank for r in steps} == {0, 1, 2, 3} and max(r.step for r in steps) == 60
    kinds = [e.kind for e in _recorded(run_dir, Part.EVENT)]
    assert {"crash", "hang", "restart", "checkpoint"} <= set(kinds)
    stacks = _recorded(run_dir, Part.STACKS)
    hang = summary["faults"][1]
    assert any(s.culprit == hang["rank"] for s in stacks), [s.culprit for s in stacks]


async def test_replay_at_the_hang_shows_the_culprit_and_stacks_the_agent_diagnosed(
    demo: tuple[Path, dict[str, Any]],
) -> None:
    run_dir, summary = demo
    replay = Replay.open([run_dir])
    hang = replay.first_incident("hang")
    assert hang is not None
    live = next(s for s in _recorded(run_dir, Part.STACKS) if s.culprit >= 0)
    app = DashboardApp(replay=replay)
    async with app.run_test(size=SIZE) as pilot:
        app.seek(hang.wall_time)
        assert "REPLAY" in app.view_state().title
        await pilot.press("s")
        await until(pilot, lambda: isinstance(app.screen, DiagnosisScreen) and app.screen.stacks is not None, "stacks")
        screen = app.screen
        assert isinstance(screen, DiagnosisScreen) and screen.stacks is not None
        assert screen.stacks.culprit == summary["faults"][1]["rank"] == 2
        shown = {row.rank: row.text for row in screen.stacks.rows}
        assert {r.rank: r.text for r in live.ranks}.items() <= shown.items()
        # The model reads as it did then: the hang is the newest fault, and not restarted yet.
        newest = app.model.faults()[-1]
        assert (newest.kind, newest.rank, newest.restart) == ("hang", 2, None)
    replay.close()


def test_replay_once_prints_the_cluster_at_the_hang(demo: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = demo
    result = run_megascope("replay", str(run_dir), "--at", "hang", "--once", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rank 2 hangs" in result.stdout and "STALLED" in result.stdout


def test_export_round_trips_steps_and_events(demo: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    run_dir, _ = demo
    events_out = tmp_path / "events.jsonl"
    assert run_megascope("export", str(run_dir), "--what", "events", "--format", "jsonl", "--out", str(events_out),
                         timeout=120).returncode == 0  # fmt: skip
    parsed = [
        json_format.ParseDict(json.loads(line), telemetry_pb2.Event()) for line in events_out.read_text().splitlines()
    ]
    assert sorted(e.SerializeToString() for e in parsed) == sorted(
        e.SerializeToString() for e in _recorded(run_dir, Part.EVENT)
    )
    steps_out = tmp_path / "steps.csv"
    assert run_megascope("export", str(run_dir), "--out", str(steps_out), timeout=120).returncode == 0
    with steps_out.open() as file:
        rows = list(csv.DictReader(file))
    recorded = _recorded(run_dir, Part.STEP)
    assert len(rows) == len(recorded)
    by_key = {(r.rank, r.step, r.wall_time): r for r in recorded}
    for row in rows:
        report = by_key[(int(row["rank"]), int(row["step"]), float(row["wall_time"]))]
        assert float(row["loss"]) == report.loss
        assert len(json.loads(row["collectives"])) == len(report.collectives)


def test_report_names_the_injected_faults_and_draws_its_plots(
    demo: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    run_dir, summary = demo
    result = run_megascope("report", str(run_dir), "--out", str(tmp_path / "report"), timeout=120)
    assert result.returncode == 0, result.stderr
    page = (tmp_path / "report" / "report.md").read_text()
    timeline = [line for line in page.splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert "| crash |" in timeline[0] and "| node1 | 3 |" in timeline[0] and "SIGKILL" in timeline[0]
    assert "| hang |" in timeline[1] and "| node1 | 2 |" in timeline[1] and "culprit rank 2" in timeline[1]
    assert "ETTR" in page and "## Checkpoints" in page
    for name in ("loss", "step_time", "stragglers"):
        assert (tmp_path / "report" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_stacks_recorded_at_the_hang_parse_as_the_agent_sent_them(demo: tuple[Path, dict[str, Any]]) -> None:
    run_dir, _ = demo
    stacks = _recorded(run_dir, Part.STACKS)
    assert all(isinstance(s, agent_pb2.DumpStacksResponse) for s in stacks)
    assert any(r.answered and "File" in r.text for s in stacks for r in s.ranks)
