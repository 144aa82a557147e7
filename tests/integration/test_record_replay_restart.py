"""An agent killed with SIGKILL and started again on the same run directory carries on the same record, and a
dashboard that connects after the restart is back-filled from it (issue 16)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from support import REPO

from megascope.engine.runtime import run_dir as run_paths
from megascope.protos.megascope.v1 import agent_pb2, agent_pb2_grpc
from megascope.protos.recording import Part, RecordReader


def _agent(run_dir: Path) -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "megascope.agent.cli", "agent", "--no-launch", "--port", "0", "--node", "n0",
         "--run-dir", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    assert process.stdout is not None
    line = process.stdout.readline()
    assert "listening on" in line, line + (process.stderr.read() if process.stderr else "")
    return process, line.rsplit(" ", 1)[-1].strip()


def _host_times(path: Path) -> list[float]:
    with RecordReader(path) as reader:
        times = [row.wall_time for row in reader.rows([Part.HOST])]
        assert reader.damage is None
    return times


def _wait_for_rows(path: Path, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # The agent creates the file before its first commit: empty until then, not yet a record to read.
        if path.is_file() and path.stat().st_size > 0 and len(_host_times(path)) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{path}: fewer than {count} host samples recorded after {timeout} s")


def test_an_agent_killed_and_restarted_carries_on_its_record_and_back_fills_from_it(tmp_path: Path) -> None:
    record = run_paths.record_file(tmp_path, "n0")
    first, _ = _agent(tmp_path)
    try:
        _wait_for_rows(record, 4)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    before = _host_times(record)
    killed_at = time.time()

    second, address = _agent(tmp_path)
    try:
        _wait_for_rows(record, len(before) + 3)
        after = _host_times(record)
        # Intact (everything committed before the kill is there, in order) and continuous (the same file goes on).
        assert after[: len(before)] == before
        assert after == sorted(after) and after[-1] > killed_at
        # A dashboard connecting now is back-filled with samples from before the restart: from the record.
        with grpc.insecure_channel(address) as channel:
            stream = agent_pb2_grpc.AgentServiceStub(channel).Watch(agent_pb2.WatchRequest(), timeout=20)
            backfilled: list[float] = []
            for response in stream:
                if not response.telemetry.backfill:
                    break
                backfilled += [s.wall_time for s in response.telemetry.host_samples]
            stream.cancel()
        assert set(before) <= set(backfilled)
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    with RecordReader(record) as reader:
        kinds = [m.kind for _, m in reader.messages(Part.EVENT)]  # type: ignore[attr-defined]
    # Both agents' lives are in the one record: two starts, one clean stop (the killed one never said goodbye).
    assert kinds.count("agent_started") == 2 and kinds.count("agent_stopping") == 1
