"""`megascope demo --headless` end to end: two agents, four ranks, one job, and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from support import REPO


class ProcessTree:
    """Polls a process's descendants while it runs, so we can check afterwards that all of them are gone."""

    def __init__(self, root: subprocess.Popen[str]) -> None:
        self.root = root
        self.seen: dict[int, psutil.Process] = {}
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while self.root.poll() is None:
            try:
                for child in psutil.Process(self.root.pid).children(recursive=True):
                    self.seen.setdefault(child.pid, child)
            except psutil.Error:
                pass
            time.sleep(0.2)

    def alive(self) -> list[int]:
        alive = []
        for pid, process in self.seen.items():
            try:
                if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.Error:
                pass
        return alive


def start_demo(*args: str, run_dir: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "demo", "--headless", "--run-dir", str(run_dir), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip


def test_headless_demo_trains_four_ranks_and_leaves_no_process(tmp_path: Path) -> None:
    demo = start_demo("--steps", "30", "--json", run_dir=tmp_path)
    tree = ProcessTree(demo)
    stdout, stderr = demo.communicate(timeout=240)
    assert demo.returncode == 0, stderr[-3000:]
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["nodes"] == 2 and summary["ranks"] == 4 and summary["steps"] == 30
    assert summary["last_loss"] < summary["first_loss"]
    assert summary["tokens_per_s"] > 0 and summary["restarts"] == 0 and summary["stragglers"] == []
    finished = [e for e in summary["events"] if e["kind"] == "finished"]
    assert sorted(e["rank"] for e in finished) == [0, 1, 2, 3]
    assert all({"kind", "rank", "step", "time", "text"} <= set(e) for e in summary["events"])
    assert "ranks 4/4 running" in stderr  # the live status lines went to stderr, JSON alone on stdout
    assert len(tree.seen) >= 2 + 2 + 4  # agents, their torchruns, the ranks: the tree was really watched
    time.sleep(0.5)
    assert tree.alive() == []


def test_demo_stopped_by_sigterm_stops_everything_it_started(tmp_path: Path) -> None:
    demo = start_demo("--steps", "100000", run_dir=tmp_path)
    tree = ProcessTree(demo)
    assert demo.stdout is not None
    deadline = time.monotonic() + 180
    for line in demo.stdout:
        if "ranks 4/4 running" in line or time.monotonic() > deadline:
            break
    demo.send_signal(signal.SIGTERM)
    demo.wait(timeout=60)
    assert demo.returncode != 0  # interrupted, not finished
    time.sleep(0.5)
    assert len(tree.seen) >= 2 + 2 + 4
    assert tree.alive() == []
