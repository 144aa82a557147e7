"""The run's live ETTR (dashboard/model/ettr.py): useful step time (each step once, the execution the model went
through) over wall time from the start of the first step to the end of the newest, as bench/faults.py defines it;
in the cluster model's header and in ``megascope status --json``."""

from __future__ import annotations

import json

import pytest

from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.model.ettr import EttrTracker
from megascope.dashboard.status_cli import snapshot_dict
from megascope.protos.megascope.v1 import telemetry_pb2

T0 = 1_767_225_600.0
A = "10.0.0.1:50051"


def report(step: int, end: float, seconds: float = 1.0, rank: int = 0, attempt: int = 0) -> telemetry_pb2.StepReport:
    return telemetry_pb2.StepReport(
        rank=rank, step=step, step_seconds=seconds, wall_time=end, restart_count=attempt, world_size=4
    )


def steps(tracker: EttrTracker, first: int, last: int, start: float, seconds: float = 1.0, attempt: int = 0) -> float:
    """Steps ``first``..``last`` back to back from ``start``; the end of the last."""
    end = start
    for step in range(first, last + 1):
        end += seconds
        tracker.offer(report(step, end, seconds, attempt=attempt))
    return end


def test_back_to_back_steps_are_all_useful_time() -> None:
    tracker = EttrTracker()
    steps(tracker, 1, 10, T0)
    assert tracker.ettr() == pytest.approx(1.0)
    assert tracker.wall_seconds() == pytest.approx(10.0)


def test_nothing_is_known_before_a_step_with_a_time() -> None:
    tracker = EttrTracker()
    assert tracker.ettr() is None
    tracker.offer(report(1, T0, seconds=0.0))  # a script that reports steps without times
    assert tracker.ettr() is None


def test_a_gap_for_a_fault_counts_as_wall_time_only() -> None:
    tracker = EttrTracker()
    end = steps(tracker, 1, 10, T0)
    steps(tracker, 11, 20, end + 5.0)  # 5 s detecting and recovering
    assert tracker.ettr() == pytest.approx(20.0 / 25.0)


def test_a_step_redone_in_place_counts_once_its_newer_execution() -> None:
    tracker = EttrTracker()
    end = steps(tracker, 1, 10, T0)
    # Recovered in place from step 9: step 10 is done again (2 s this time), after a 3 s recovery.
    steps(tracker, 10, 12, end + 3.0, seconds=2.0)
    useful = 9 * 1.0 + 3 * 2.0
    assert tracker.useful_seconds() == pytest.approx(useful)
    assert tracker.ettr() == pytest.approx(useful / (10.0 + 3.0 + 6.0))


def test_a_restart_from_a_checkpoint_forgets_the_steps_after_it() -> None:
    tracker = EttrTracker()
    end = steps(tracker, 1, 10, T0)
    # Torch elastic restarted every rank (attempt 1) from the checkpoint of step 5, after 10 s.
    steps(tracker, 6, 8, end + 10.0, attempt=1)
    assert tracker.useful_seconds() == pytest.approx(8.0)  # steps 1..5 of attempt 0, 6..8 of attempt 1
    assert tracker.ettr() == pytest.approx(8.0 / 23.0)


def test_a_replayed_report_changes_nothing() -> None:
    tracker = EttrTracker()
    steps(tracker, 1, 10, T0)
    before = (tracker.useful_seconds(), tracker.wall_seconds())
    tracker.offer(report(4, T0 + 4.0))  # a reconnect's back-fill sends it again
    assert (tracker.useful_seconds(), tracker.wall_seconds()) == before


def test_a_late_report_of_an_older_attempt_is_ignored() -> None:
    tracker = EttrTracker()
    end = steps(tracker, 1, 5, T0)
    steps(tracker, 4, 6, end + 2.0, attempt=1)
    tracker.offer(report(5, T0 + 5.0, attempt=0))  # from before the restart, arriving late
    assert tracker.useful_seconds() == pytest.approx(6.0)


def test_reports_out_of_order_count_the_same() -> None:
    ordered, shuffled = EttrTracker(), EttrTracker()
    reports = [report(s, T0 + s) for s in range(1, 11)]
    for r in reports:
        ordered.offer(r)
    for r in reports[5:] + reports[:5]:  # a later batch came first
        shuffled.offer(r)
    assert shuffled.useful_seconds() == ordered.useful_seconds()
    assert shuffled.ettr() == ordered.ettr()


def test_the_lowest_rank_is_the_one_counted() -> None:
    tracker = EttrTracker()
    tracker.offer(report(1, T0 + 1.0, rank=2))
    tracker.offer(report(1, T0 + 1.5, seconds=1.5, rank=0))
    tracker.offer(report(2, T0 + 9.0, seconds=1.0, rank=2))  # not rank 0's: it does not move the count
    assert tracker.rank == 0
    assert tracker.useful_seconds() == pytest.approx(1.5)
    assert tracker.wall_seconds() == pytest.approx(1.5)


def test_memory_stays_within_the_window_and_the_ratio_is_the_same() -> None:
    small, whole = EttrTracker(window=8), EttrTracker(window=10_000)
    for tracker in (small, whole):
        end = steps(tracker, 1, 500, T0, seconds=0.5)
        steps(tracker, 501, 600, end + 7.0, seconds=0.5)
    assert small.steps_kept() == 8
    assert small.ettr() == pytest.approx(whole.ettr())


def test_a_redo_from_before_the_window_takes_the_folded_steps_out_at_their_mean() -> None:
    tracker = EttrTracker(window=4)
    end = steps(tracker, 1, 20, T0)
    steps(tracker, 11, 12, end + 5.0, attempt=1)  # restarted from the checkpoint of step 10
    assert tracker.useful_seconds() == pytest.approx(12.0)


def test_a_window_of_no_steps_is_refused() -> None:
    with pytest.raises(ValueError, match="window must be at least 1 step"):
        EttrTracker(window=0)


def test_the_model_header_and_status_json_carry_the_ettr() -> None:
    model = ClusterModel([A], clock=lambda: T0 + 100)
    reports = [report(s, T0 + s, rank=r) for s in range(1, 11) for r in (0, 1)]
    reports += [report(s, T0 + 5 + s, rank=r) for s in range(11, 21) for r in (0, 1)]  # 5 s down after step 10
    model.ingest(A, telemetry_pb2.Telemetry(step_reports=reports))
    assert model.header().ettr == pytest.approx(20.0 / 25.0)
    snapshot = json.loads(json.dumps(snapshot_dict(model)))
    assert snapshot["header"]["ettr"] == pytest.approx(0.8)
