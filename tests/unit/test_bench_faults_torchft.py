"""bench/faults.py's torchft side, without torchft: its measurement on replica telemetry written here the way
bench/torchft_replica.py writes it (one line per step attempt), and the side left out when torchft is missing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import pytest
from support import load_bench_script

from megascope.engine.runtime.faults import CrashFault
from megascope.engine.runtime.run_dir import fault_marker, telemetry_dir

T0 = 1_767_225_600.0
REPLICAS = 4
BATCH = 1024


faults = load_bench_script("faults")


def write_attempt(
    run_dir: Path, replica: int, step: int, done: float, participants: int, committed: bool = True
) -> None:
    telemetry_dir(run_dir).mkdir(parents=True, exist_ok=True)
    record = {"type": "step", "replica": replica, "start": 0, "step": step, "wall_time": done, "step_seconds": 1.0,
              "committed": committed, "participants": participants, "tokens": BATCH if committed else 0}  # fmt: skip
    with open(telemetry_dir(run_dir) / f"replica{replica}.jsonl", "a") as out:
        out.write(json.dumps(record) + "\n")


def crash_run(tmp_path: Path) -> Any:
    """Replica 1 crashes as step 5 starts (T0 + 4); the other three commit steps 5-7 without it (a quorum of 3, the
    first after the lighthouse's join timeout); replica 1, started again, heals and all four commit steps 8-10."""
    crash = CrashFault(rank=1, step=5, how="kill")
    for step in range(1, 11):
        for replica in range(REPLICAS):
            if step <= 4:
                write_attempt(tmp_path, replica, step, T0 + step, REPLICAS)
            elif step <= 7 and replica != 1:
                write_attempt(tmp_path, replica, step, T0 + step + 0.5, REPLICAS - 1)
            elif step >= 8:
                write_attempt(tmp_path, replica, step, T0 + step + 0.5, REPLICAS)
    marker = fault_marker(tmp_path, crash.describe(), 0)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.utime(marker, (T0 + 4, T0 + 4))
    # Fault-free, four replicas commit 4 batches a second.
    return faults.measure_torchft(tmp_path, [crash], 10, T0 - 10, T0 + 100, 0, REPLICAS * BATCH / 1.0)


def test_torchft_detection_is_the_survivors_first_smaller_quorum(tmp_path: Path) -> None:
    result = crash_run(tmp_path).faults[0]
    assert result.detect_s == pytest.approx(1.5)
    assert result.detection.seen_as == "replica 0 step 5: quorum of 3"


def test_torchft_recovers_when_every_replica_commits_a_step_again(tmp_path: Path) -> None:
    assert crash_run(tmp_path).faults[0].mttr_s == pytest.approx(4.5)


def test_torchft_ettr_counts_the_committed_tokens(tmp_path: Path) -> None:
    side = crash_run(tmp_path)
    # 16 batches in steps 1-4, 9 in steps 5-7, 12 in steps 8-10, over 10.5 s in which four replicas commit 42.
    assert side.ettr == pytest.approx(37 / 42)
    assert side.extra["committed_tokens"] == 37 * BATCH
    assert side.completed


def test_torchft_counts_the_replica_steps_a_fault_lost(tmp_path: Path) -> None:
    side = crash_run(tmp_path)
    assert side.extra["replica_steps_lost"] == [3]  # replica 1's batches of steps 5, 6 and 7
    assert side.faults[0].steps_redone is None  # no step is redone: the job goes on without those batches


def test_the_torchft_side_is_left_out_with_the_install_command_when_torchft_is_missing() -> None:
    missing = "torchft is not installed: pip install torchft-nightly"
    assert faults.drop_unavailable(["megascope", "torchft", "torchrun"], missing) == ["megascope", "torchrun"]


def test_the_torchft_side_stays_when_torchft_is_installed() -> None:
    assert faults.drop_unavailable(["megascope", "torchft"], None) == ["megascope", "torchft"]


def test_torchft_is_a_side() -> None:
    assert faults.parse_sides("megascope,torchrun,torchft") == ["megascope", "torchrun", "torchft"]


def test_torchft_detects_a_fault_while_an_earlier_one_keeps_a_replica_out(tmp_path: Path) -> None:
    """Replica 1 is out from step 5 on; replica 2 crashes as step 8 starts: seen when the quorum drops to 2."""
    first, second = CrashFault(rank=1, step=5, how="kill"), CrashFault(rank=2, step=8, how="kill")
    for step in range(1, 11):
        for replica in range(REPLICAS):
            if step <= 4:
                write_attempt(tmp_path, replica, step, T0 + step, REPLICAS)
            elif replica in (0, 3) or (replica == 2 and step <= 7):
                write_attempt(tmp_path, replica, step, T0 + step + 0.5, 3 if step <= 7 else 2)
    for fault, when in ((first, T0 + 4), (second, T0 + 7.6)):
        marker = fault_marker(tmp_path, fault.describe(), 0)
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        os.utime(marker, (when, when))
    side = faults.measure_torchft(tmp_path, [first, second], 10, T0 - 10, T0 + 100, 1, REPLICAS * BATCH / 1.0)
    assert side.faults[1].detection.seen_as == "replica 0 step 8: quorum of 2"
    assert side.faults[1].detect_s == pytest.approx(0.9)
    assert side.faults[1].mttr_s is None  # never all four again


def test_torchft_ettr_against_its_own_pace_is_kept_beside(tmp_path: Path) -> None:
    side = crash_run(tmp_path)
    assert side.extra["pace_s_before_faults"] == pytest.approx(1.0)
    assert side.extra["ettr_own_pace"] == pytest.approx(round(37 / 42, 4))


def test_torchft_detection_is_the_supervisor_restarting_the_replica_when_that_comes_first(tmp_path: Path) -> None:
    crash = CrashFault(rank=1, step=5, how="kill")
    for step in range(1, 11):  # replica 1 is back in the very next quorum: no survivor sees a smaller one
        for replica in range(REPLICAS):
            write_attempt(tmp_path, replica, step, T0 + step + (0.5 if step >= 5 else 0.0), REPLICAS)
    marker = fault_marker(tmp_path, crash.describe(), 0)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.utime(marker, (T0 + 4, T0 + 4))
    restarted = [{"time": T0 + 4.2, "replica": 1, "what": "exit -9: started again"}]
    side = faults.measure_torchft(tmp_path, [crash], 10, T0 - 10, T0 + 100, 0, REPLICAS * BATCH / 1.0, restarted)
    assert side.faults[0].detection.seen_as == "supervisor: replica 1 exit -9: started again"
    assert side.faults[0].detect_s == pytest.approx(0.2)


def test_without_torchft_the_reason_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torchft", None)  # what an import finds when torchft is not installed
    assert faults.torchft_missing() == f"torchft is not installed: {faults.TORCHFT_INSTALL}"
    assert "pip install torchft-nightly" in faults.TORCHFT_INSTALL
