"""bench/faults.py's measurement and summary, on run directories written here the way a run leaves them (the ranks'
telemetry lines, the faults' marker files): what a recovery in place and a restart each count, the goals of issue
18, the median and range over runs, the steady-state overhead and the ``--sides`` flag."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from support import load_bench_script

from megascope.engine.runtime.faults import CrashFault, HangFault
from megascope.engine.runtime.run_dir import fault_marker, telemetry_dir

T0 = 1_767_225_600.0
RANKS = 4


faults = load_bench_script("faults")


def write_steps(run_dir: Path, steps: Iterable[tuple[int, int, float]], seconds: float = 1.0) -> None:
    """Every rank records each (attempt, step, end wall time), as the trainer's telemetry does."""
    telemetry_dir(run_dir).mkdir(parents=True, exist_ok=True)
    steps = list(steps)
    for rank in range(RANKS):
        with open(telemetry_dir(run_dir) / f"rank{rank}.jsonl", "a") as out:
            for attempt, step, end in steps:
                record = {"type": "step", "restart_count": attempt, "step": step, "wall_time": end,
                          "step_seconds": seconds}  # fmt: skip
                out.write(json.dumps(record) + "\n")


def fire(run_dir: Path, fault: CrashFault | HangFault, when: float) -> None:
    """The marker the faulty rank creates as the fault fires, with that time as its mtime."""
    marker = fault_marker(run_dir, fault.describe(), 0)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os.utime(marker, (when, when))


def back_to_back(attempt: int, first: int, last: int, start: float) -> list[tuple[int, int, float]]:
    """Steps ``first``..``last`` of one second each from ``start``."""
    return [(attempt, step, start + step - first + 1) for step in range(first, last + 1)]


def in_place_run(tmp_path: Path, steps: int = 10, gap: float = 2.0) -> Any:
    """A crash at the start of step 6 (after 5 steps), ``gap`` seconds of recovery, then step 6 again and on, all in
    the same attempt, detected 0.1 s after the fault."""
    crash = CrashFault(rank=0, step=6, how="kill")
    write_steps(tmp_path, back_to_back(0, 1, 5, T0) + back_to_back(0, 6, steps, T0 + 5 + gap))
    fire(tmp_path, crash, T0 + 5)
    detections = [faults.Detection(T0 + 5.1, "crash rank 0")]
    return faults.measure("megascope", tmp_path, [crash], detections, steps, T0 - 10, T0 + 100, 0)


def test_a_recovery_in_place_redoes_only_the_step_in_flight(tmp_path: Path) -> None:
    side = in_place_run(tmp_path)
    result = side.faults[0]
    assert (result.steps_lost, result.steps_redone, side.restarts) == (0, 1, 0)


def test_a_recovery_in_place_times_to_the_redone_step(tmp_path: Path) -> None:
    result = in_place_run(tmp_path).faults[0]
    assert result.detect_s == pytest.approx(0.1)
    assert result.mttr_s == pytest.approx(3.0)  # 2 s of recovery, then step 6 (1 s)


def test_a_recovery_in_place_counts_its_pause_as_lost_time(tmp_path: Path) -> None:
    side = in_place_run(tmp_path)
    assert side.ettr == pytest.approx(10 / 12)
    assert side.completed


def test_a_restart_redoes_the_steps_since_the_checkpoint_and_the_one_in_flight(tmp_path: Path) -> None:
    crash = CrashFault(rank=1, step=6, how="kill")
    # Attempt 0 did 5 steps; the restart resumes after the checkpoint of step 4, 15 s later.
    write_steps(tmp_path, back_to_back(0, 1, 5, T0) + back_to_back(1, 5, 10, T0 + 20))
    fire(tmp_path, crash, T0 + 5)
    side = faults.measure("megascope-restart", tmp_path, [crash], [], 10, T0 - 10, T0 + 100, 0)
    result = side.faults[0]
    assert (result.steps_lost, result.steps_redone, side.restarts) == (1, 2, 1)
    assert result.mttr_s == pytest.approx(16.0)
    assert side.ettr == pytest.approx(10 / 26)


def test_a_fault_that_never_fired_has_no_figures(tmp_path: Path) -> None:
    hang = HangFault(rank=2, step=50, how="stop")
    write_steps(tmp_path, back_to_back(0, 1, 10, T0))
    result = faults.measure("megascope", tmp_path, [hang], [], 10, T0 - 10, T0 + 100, 0).faults[0]
    assert (result.fired, result.detect_s, result.mttr_s, result.steps_redone) == (None, None, None, None)


def test_the_goals_are_met_by_quick_recoveries_in_place(tmp_path: Path) -> None:
    side = in_place_run(tmp_path, steps=40, gap=1.0)  # ETTR 40 / 41
    met = faults.goals([side], hang_timeout=10.0)
    assert met["ettr_ge_90pct"] and met["ettr_ge_95pct_aim"]
    assert met["mttr_crash_le_3s"] and met["steps_redone_le_1"] and met["every_fault_recovered"]


def test_a_slow_recovery_misses_the_mttr_and_ettr_goals(tmp_path: Path) -> None:
    side = in_place_run(tmp_path, steps=10, gap=5.0)  # MTTR 6 s, ETTR 10 / 15
    met = faults.goals([side], hang_timeout=10.0)
    assert not met["mttr_crash_le_3s"] and not met["ettr_ge_90pct"]
    assert met["steps_redone_le_1"]


def test_a_fault_never_recovered_from_misses_every_fault_recovered(tmp_path: Path) -> None:
    crash = CrashFault(rank=0, step=6, how="kill")
    write_steps(tmp_path, back_to_back(0, 1, 5, T0))
    fire(tmp_path, crash, T0 + 5)
    side = faults.measure("megascope", tmp_path, [crash], [], 10, T0 - 10, T0 + 100, 1)
    met = faults.goals([side], hang_timeout=10.0)
    assert not met["every_fault_recovered"] and not met["steps_redone_le_1"]


def test_spread_gives_the_median_and_range_of_the_runs_that_measured_it() -> None:
    assert faults.spread([3.0, None, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "runs": 3}


def test_spread_of_no_measurement_is_none() -> None:
    assert faults.spread([None, None]) is None


def pair(inplace: float, restart: float) -> tuple[Any, Any]:
    """A steady-state pair of fault-free runs with these paces (s/step)."""
    return (faults.SteadyRun("inplace", inplace, inplace, None, (0.0, 0.0)),
            faults.SteadyRun("restart", restart, restart, None, (0.0, 0.0)))  # fmt: skip


def test_the_steady_state_overhead_is_the_median_ratio_of_the_paces() -> None:
    pairs = [pair(0.505, 0.5), pair(0.515, 0.5), pair(0.495, 0.5)]
    assert faults.steady_overhead_pct(pairs) == pytest.approx(1.0)


def test_steady_state_pairs_close_together_are_conclusive() -> None:
    assert faults.steady_conclusive([pair(0.502, 0.5), pair(0.504, 0.5), pair(0.499, 0.5)])


def test_steady_state_pairs_spread_by_noise_are_inconclusive() -> None:
    assert not faults.steady_conclusive([pair(0.41, 0.5), pair(0.5, 0.5), pair(0.55, 0.5)])


def test_one_steady_state_pair_is_inconclusive() -> None:
    assert not faults.steady_conclusive([pair(0.5, 0.5)])


def test_the_pace_is_taken_after_the_warm_up_steps() -> None:
    executions = [faults.Execution(step=s, attempt=0, start=T0 + s - 1, done=T0 + s + (2 if s > 3 else 0), seconds=1.0)
                  for s in range(1, 11)]  # fmt: skip
    per_step, median_step = faults.pace(executions, 10)
    assert per_step == pytest.approx((T0 + 12 - (T0 + 3)) / 7)
    assert median_step == pytest.approx(1.0)


def test_sides_keep_the_order_given() -> None:
    assert faults.parse_sides("torchrun, megascope-restart,megascope") == ["torchrun", "megascope-restart", "megascope"]


def test_an_unknown_side_is_named_in_the_error() -> None:
    with pytest.raises(ValueError, match="unknown side.*deepspeed"):
        faults.parse_sides("megascope,deepspeed")


def test_a_side_named_twice_is_refused() -> None:
    with pytest.raises(ValueError, match="named twice"):
        faults.parse_sides("megascope,megascope")
