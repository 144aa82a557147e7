"""A real two-rank gloo run through torch elastic, checked through the telemetry it leaves behind."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import pytest
from support import read_telemetry, run_megascope

STEPS = 50


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> dict[int, list[dict[str, Any]]]:
    run_dir = tmp_path_factory.mktemp("run")
    result = run_megascope(
        "train", "--nproc-per-node", "2", "--preset", "tiny", "--steps", str(STEPS),
        "--batch-tokens", "1024", "--warmup-steps", "10", "--val-every", "25", "--run-dir", str(run_dir),
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return read_telemetry(Path(run_dir))


def steps_of(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r["type"] == "step"]


def event_of(records: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (event,) = [r for r in records if r["type"] == "event" and r["kind"] == kind]
    return event


def test_both_ranks_report_every_step(two_rank_run: dict[int, list[dict[str, Any]]]) -> None:
    assert sorted(two_rank_run) == [0, 1]
    for records in two_rank_run.values():
        assert [r["step"] for r in steps_of(records)] == list(range(1, STEPS + 1))
        assert {r["world_size"] for r in steps_of(records)} == {2}


def test_loss_falls(two_rank_run: dict[int, list[dict[str, Any]]]) -> None:
    # Mean over both ranks and a few steps: single micro-batches of source code vary a lot in difficulty.
    def mean_loss(steps: range) -> float:
        return statistics.mean(
            r["loss"] for recs in two_rank_run.values() for r in steps_of(recs) if r["step"] in steps
        )

    assert mean_loss(range(STEPS - 4, STEPS + 1)) < mean_loss(range(1, 6)) - 1.0


def test_validation_loss_is_reported_and_agrees_across_ranks(two_rank_run: dict[int, list[dict[str, Any]]]) -> None:
    val = {rank: {r["step"]: r["val_loss"] for r in steps_of(recs) if r["val_loss"] is not None}
           for rank, recs in two_rank_run.items()}  # fmt: skip
    assert sorted(val[0]) == [25, 50]
    assert val[0] == pytest.approx(val[1])
    assert val[0][50] < val[0][25]


def test_parameters_are_identical_across_ranks_after_training(two_rank_run: dict[int, list[dict[str, Any]]]) -> None:
    final = {rank: event_of(recs, "finished")["run"]["param_digest"] for rank, recs in two_rank_run.items()}
    initial = {rank: event_of(recs, "started")["run"]["param_digest"] for rank, recs in two_rank_run.items()}
    assert final[0] == final[1]
    assert final[0] != initial[0]  # the weights did change


def test_step_breakdown_sums_to_step_time(two_rank_run: dict[int, list[dict[str, Any]]]) -> None:
    for records in two_rank_run.values():
        for r in steps_of(records):
            phases = (
                r["data_wait_seconds"] + r["forward_seconds"] + r["backward_seconds"]
                + r["comm_wait_seconds"] + r["optimizer_seconds"]
            )  # fmt: skip
            assert phases == pytest.approx(r["step_seconds"], rel=0.05), r
            assert min(r["forward_seconds"], r["backward_seconds"], r["optimizer_seconds"]) > 0


def test_gradient_all_reduces_are_timed_per_bucket(two_rank_run: dict[int, list[dict[str, Any]]]) -> None:
    for records in two_rank_run.values():
        for r in steps_of(records):
            collectives = r["collectives"]
            assert collectives and all(c["name"] == "allreduce" and c["bytes"] > 0 for c in collectives)
            # The wait is attributed to the collectives that caused it; what remains of comm_wait is DDP
            # copying the reduced buckets back into the gradients.
            blocked = [c["blocked_seconds"] for c in collectives]
            assert min(blocked) >= 0 and sum(blocked) <= r["comm_wait_seconds"] + 1e-4
        issued = [r["collectives_issued"] for r in steps_of(records)]
        assert issued == sorted(issued) and issued[-1] >= STEPS


def test_throughput_and_mfu_are_reported(two_rank_run: dict[int, list[dict[str, Any]]]) -> None:
    for r in steps_of(two_rank_run[0]):
        assert r["tokens"] == 1024
        assert r["tokens_per_second"] == pytest.approx(1024 / r["step_seconds"])
        assert r["model_flops"] > 6 * 1024 * 0.5e6
        assert 0 < r["mfu"] < 1.5


def test_every_rank_measures_mfu_against_the_same_peak(two_rank_run: dict[int, list[dict[str, Any]]]) -> None:
    peaks = [r["model_flops"] / r["step_seconds"] / r["mfu"] for rank in (0, 1) for r in steps_of(two_rank_run[rank])]
    assert max(peaks) == pytest.approx(min(peaks), rel=1e-9)
