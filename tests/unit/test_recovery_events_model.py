"""Recoveries in place in the dashboard's model: the ``recovered`` event (``RecoveryDetail``, rank 0 of the re-formed
group) and the agent's closing ``restart`` event that says ``in_place``. One recovery is one restart of the job (the
count, MTTR), reads "recovered in place" where a restart reads "restarted", and carries its breakdown to the fault
line, the event's detail lines, the demo summary and the postmortem report."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

from megascope.dashboard import report
from megascope.dashboard.headless import summarize
from megascope.dashboard.model.cluster import ClusterModel
from megascope.dashboard.screens.event_detail import event_detail_lines
from megascope.protos.events import WARNING, make_event
from megascope.protos.megascope.v1 import telemetry_pb2

A = "10.0.0.1:50051"
NOW = 1_767_225_600.0
_RESTART = telemetry_pb2.RestartDetail


def crash(wall_time: float = NOW + 10.0, rank: int = 2, detect: float = 0.2) -> telemetry_pb2.Event:
    detail = telemetry_pb2.CrashDetail(signal="SIGKILL", detect_seconds=detect, last_step=57)
    return make_event(f"rank {rank} died", detail, severity=WARNING, node="node0", rank=rank, step=57,
                      wall_time=wall_time)  # fmt: skip


def recovered(failed: float = NOW + 9.95, wall_time: float = NOW + 10.05) -> telemetry_pb2.Event:
    detail = telemetry_pb2.RecoveryDetail(
        replaced_ranks=[2], generation=1, step=57, donor_rank=0, steps_redone=1, failed_wall_time=failed,
        reform_seconds=0.066, transfer_seconds=0.012, state_bytes=23 * 512 * 1024, replacement_ready_seconds=0.021,
        total_seconds=0.081,
    )  # fmt: skip
    return make_event("job recovered in place", detail, severity=WARNING, node="node0", rank=0, step=57,
                      wall_time=wall_time)  # fmt: skip


def restart(wall_time: float = NOW + 11.2, in_place: bool = True, resumed: int = 57) -> telemetry_pb2.Event:
    detail = _RESTART(
        phase=_RESTART.PHASE_DONE, cause=_RESTART.CAUSE_CRASH, mttr_seconds=1.25, steps_lost=1, resumed_step=resumed,
        in_place=in_place,
    )  # fmt: skip
    return make_event("job came back", detail, severity=WARNING, node="node0", rank=0, step=resumed,
                      wall_time=wall_time)  # fmt: skip


def model_with(*events: telemetry_pb2.Event) -> ClusterModel:
    model = ClusterModel([A], clock=lambda: NOW + 100.0)
    model.ingest(A, telemetry_pb2.Telemetry(events=events))
    return model


def test_a_recovery_in_place_is_one_restart_with_its_mttr_and_its_breakdown() -> None:
    model = model_with(crash(), recovered(), restart())
    header = model.header()
    assert header.restarts == 1
    [fault] = model.faults()
    assert fault.restart is not None and fault.restart.in_place
    assert fault.restart.mttr_seconds == 1.25
    assert fault.restart.recovery is not None and fault.restart.recovery.replaced_ranks == (2,)
    assert fault.describe() == (
        "crash: rank 2 on node0 (SIGKILL) after step 57, detected in 0.20s; recovered in place from step 57, "
        "MTTR 1.2s, 1 step redone (total 81 ms: re-form 66 ms, state 11.5 MiB in 12 ms, replacement ready in 21 ms)"
    )


def test_a_recovered_event_before_its_restart_event_ends_the_fault_and_counts_once() -> None:
    model = model_with(crash(), recovered())
    assert model.header().restarts == 1
    restart_now = model.header().last_fault
    assert restart_now is not None and restart_now.restart is not None and restart_now.restart.in_place
    assert restart_now.restart.mttr_seconds is None  # the agent's restart event measures it
    model.ingest(A, telemetry_pb2.Telemetry(events=[restart()]))
    assert model.header().restarts == 1
    [joined] = model.restarts()
    assert joined.mttr_seconds == 1.25 and joined.recovery is not None


def test_a_crash_reported_after_its_recovery_was_over_is_still_ended_by_it() -> None:
    # The rank died at +9.9 s; the others had recovered by +10.05 s; the agent had its exit report at +10.4 s.
    model = model_with(recovered(), crash(NOW + 10.4, detect=0.5))
    [fault] = model.faults()
    assert fault.restart is not None and fault.restart.in_place
    assert model.header().restarts == 1


def test_a_crash_after_a_recovery_is_a_new_fault_not_yet_recovered() -> None:
    model = model_with(crash(), recovered(), crash(NOW + 30.0, rank=1))
    first, second = model.faults()
    assert first.restart is not None and second.restart is None


def test_an_in_place_restart_without_its_recovered_event_reads_in_place_with_the_completed_steps_lost() -> None:
    model = model_with(crash(), restart())
    [fault] = model.faults()
    assert fault.describe().endswith("; recovered in place from step 57, MTTR 1.2s, 1 completed step lost")
    assert model.header().restarts == 1


def test_a_full_restart_after_a_recovery_is_a_second_restart_and_not_in_place() -> None:
    later_crash = crash(NOW + 50.0, rank=1)
    full = restart(NOW + 70.0, in_place=False, resumed=40)
    model = model_with(crash(), recovered(), restart(), later_crash, full)
    assert model.header().restarts == 2
    first, second = model.restarts()
    assert first.in_place and first.recovery is not None
    assert not second.in_place and second.recovery is None
    assert model.faults()[1].describe().endswith("; restarted from step 40, MTTR 1.2s, 1 step lost")


def test_a_replayed_recovered_event_is_counted_once() -> None:
    model = model_with(crash(), recovered())
    model.ingest(A, telemetry_pb2.Telemetry(events=[recovered()]))  # a reconnect replays the back-fill
    assert model.header().restarts == 1 and len(model.recoveries()) == 1


def test_the_recovered_events_detail_lines_give_the_breakdown_in_words() -> None:
    model = model_with(crash(), recovered(), restart())
    [row] = [e for e in model.events() if e.kind == "recovered"]
    lines = dict(event_detail_lines(row))
    assert lines["re-form"].startswith("66 ms")
    assert lines["state transfer"] == "12 ms, 11.5 MiB from rank 0"
    assert lines["replacement ready"].startswith("21 ms")
    assert lines["total"].startswith("81 ms")
    assert (lines["steps redone"], lines["replaced ranks"], lines["donor rank"], lines["generation"]) == (
        "1", "2", "0", "1",
    )  # fmt: skip
    assert lines["reform_seconds"] == "0.066"  # the raw attributes follow


def test_the_demo_summary_says_in_place_and_carries_the_breakdown() -> None:
    model = model_with(crash(), recovered(), restart())
    cluster = SimpleNamespace(nodes=1, run_dir=Path("runs/x"))
    summary = json.loads(json.dumps(summarize(model, cluster, None, [0])))  # type: ignore[arg-type]
    assert summary["restarts"] == 1
    assert summary["faults"][0]["in_place"] is True
    [details] = summary["restart_details"]
    assert details["in_place"] is True and details["recovery"]["state_bytes"] == 23 * 512 * 1024


def test_the_report_says_in_place_and_tables_the_breakdown(tmp_path: Path) -> None:
    model = model_with(crash(), recovered(), restart())
    facts = report.RunFacts(
        run_id="r", nodes=["node0"], start=NOW, end=NOW + 60.0, warnings=[], faults=model.faults(),
        recoveries=model.recoveries(), step_ettr=(0.95, 57.0, 60.0),
    )  # fmt: skip
    page = report.write(facts, tmp_path).read_text()
    assert "| in place, " in page
    assert "### Recoveries in place" in page
    assert "| 2 | 1 | 57 | 0 | 66 ms | 11.5 MiB in 12 ms | 21 ms | 81 ms | 1 |" in page
    assert "ETTR by the steps 95.0%" in page
