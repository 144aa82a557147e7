"""The dashboard's cluster model on hand-made telemetry: header math, odd batches, statuses, bounds."""

from __future__ import annotations

import asyncio

import pytest
from support.wire import batch, running, step_report

from megascope.dashboard.control import DashboardControl, ReadOnlyError
from megascope.dashboard.model import store
from megascope.dashboard.model.cluster import ClusterModel, ConnectionState, RankStatusName
from megascope.dashboard.widgets.header import header_fields
from megascope.protos.events import make_event
from megascope.protos.megascope.v1 import telemetry_pb2

A, B = "10.0.0.1:50051", "10.0.0.2:50051"
NOW = 1_767_225_600.0


def report(rank: int, step: int, **fields: object) -> telemetry_pb2.StepReport:
    """Four ranks, two a node, one 1 s step a second from NOW."""
    values: dict[str, object] = {"node": "node0" if rank < 2 else "node1", "world_size": 4, "loss": 3.0,
                                 "tokens": 1000, "step_seconds": 1.0, "tokens_per_second": 1000.0,
                                 "wall_time": NOW + step}  # fmt: skip
    values.update(fields)
    return step_report(rank, step, **values)


def node_info(node: str, ranks: list[int], **fields: object) -> telemetry_pb2.NodeInfo:
    values: dict[str, object] = {"node": node, "ranks": ranks, "world_size": 4, "start_wall_time": NOW}
    values.update(fields)
    return telemetry_pb2.NodeInfo(**values)  # type: ignore[arg-type]


def model_with(*agents: str) -> ClusterModel:
    model = ClusterModel(agents, clock=lambda: NOW + 100.0)
    for address in agents:
        model.set_connected(address)
    return model


def status_of(model: ClusterModel, rank: int) -> RankStatusName:
    return next(r.status for r in model.rank_rows() if r.rank == rank)


def test_header_step_is_the_last_step_every_rank_completed() -> None:
    model = model_with(A)
    model.ingest(A, batch(report(0, 1), report(0, 2), report(0, 3), report(1, 1), report(1, 2)))
    assert model.header().step == 2


def test_throughput_is_all_tokens_over_the_slowest_ranks_step_time() -> None:
    model = model_with(A)
    model.ingest(A, batch(info=node_info("node0", [0, 1], total_steps=10)))
    model.ingest(
        A,
        batch(
            report(0, 4, tokens=1000, step_seconds=0.5, loss=2.0, mfu=0.2),
            report(1, 4, tokens=1000, step_seconds=1.0, loss=4.0, mfu=0.4),
        ),
    )
    header = model.header()
    assert header.tokens_per_second == pytest.approx(2000.0)  # 2000 tokens in the slow rank's 1.0 s
    assert header.step_seconds == pytest.approx(1.0)
    assert header.loss == pytest.approx(3.0)
    assert header.mfu == pytest.approx(0.3)
    assert header.eta_seconds == pytest.approx(6.0)  # 6 steps left at 1.0 s


def test_throughput_is_the_median_over_recent_complete_steps() -> None:
    model = model_with(A)
    for step, seconds in [(1, 1.0), (2, 2.0), (3, 10.0)]:
        model.ingest(A, batch(report(0, step, step_seconds=seconds), report(1, step, step_seconds=seconds)))
    assert model.header().tokens_per_second == pytest.approx(1000.0)  # median of 2000, 1000, 200


def test_mfu_is_none_when_no_rank_reports_it() -> None:
    model = model_with(A)
    model.ingest(A, batch(report(0, 1), report(1, 1)))
    assert model.header().mfu is None


def test_uptime_counts_from_the_earliest_agent_start() -> None:
    model = model_with(A, B)
    model.ingest(A, batch(info=node_info("node0", [0], start_wall_time=NOW + 40)))
    model.ingest(B, batch(info=node_info("node1", [1], start_wall_time=NOW + 10)))
    assert model.header().uptime_seconds == pytest.approx(90.0)


def test_out_of_order_batches_do_not_move_a_rank_backwards() -> None:
    model = model_with(A)
    model.ingest(A, batch(report(0, 5, loss=1.5)))
    model.ingest(A, batch(report(0, 3, loss=9.0)))
    row = model.rank_rows()[0]
    assert (row.step, row.loss) == (5, 1.5)
    assert [step for step, _ in model.loss_history()] == [3, 5]


def test_replayed_batches_change_nothing() -> None:
    model = model_with(A)
    saved = telemetry_pb2.CheckpointDetail(phase=telemetry_pb2.CheckpointDetail.PHASE_SAVED, step=1)
    event = make_event("saved", saved, node="node0", wall_time=NOW)
    host = telemetry_pb2.HostSample(node="node0", wall_time=NOW, cpu_percent=50.0)
    first = batch(report(0, 1), report(1, 1), events=[event], hosts=[host], info=node_info("node0", [0, 1]))
    model.ingest(A, first)
    before = (model.header(), model.rank_rows(), model.events(), model.loss_history(), model.history_sizes())
    model.ingest(A, first)  # a reconnect replays the back-fill
    after = (model.header(), model.rank_rows(), model.events(), model.loss_history(), model.history_sizes())
    assert after == before


def test_empty_batches_and_missing_node_info_are_harmless() -> None:
    model = model_with(A)
    model.ingest(A, telemetry_pb2.Telemetry())
    model.ingest(A, batch(report(7, 1)))  # a rank nobody announced, no node info
    assert [r.rank for r in model.rank_rows()] == [7]
    assert model.node_rows()[0].node == A  # named by address until the agent says its name
    assert model.header().step == 1


def test_late_joining_rank_holds_the_header_step_back() -> None:
    model = model_with(A, B)
    model.ingest(A, batch(report(0, 10), report(1, 10)))
    assert model.header().step == 10
    model.ingest(B, batch(info=node_info("node1", [2])))  # announced, nothing reported yet
    assert model.header().step is None
    assert status_of(model, 2) is RankStatusName.STARTING
    model.ingest(B, batch(report(2, 3)))
    assert model.header().step == 3


def test_disconnected_agent_marks_its_ranks_disconnected() -> None:
    model = model_with(A, B)
    model.ingest(A, batch(report(0, 1), statuses=[running(0)]))
    model.ingest(B, batch(report(2, 1), statuses=[running(2)]))
    model.set_disconnected(B, "UNAVAILABLE: connection refused")
    assert status_of(model, 0) is RankStatusName.RUNNING
    assert status_of(model, 2) is RankStatusName.DISCONNECTED
    node = next(n for n in model.node_rows() if n.agent == B)
    assert node.connection is ConnectionState.DISCONNECTED
    assert node.connection_error == "UNAVAILABLE: connection refused"
    assert model.header().connected_agents == 1
    assert model.events()[-1].kind == "disconnected"


def test_rank_status_follows_the_agents_rank_state() -> None:
    model = model_with(A)
    statuses = [running(0, telemetry_pb2.RANK_STATE_FAILED), running(1, telemetry_pb2.RANK_STATE_HUNG)]
    model.ingest(A, batch(report(0, 1), report(1, 1), statuses=statuses))
    assert status_of(model, 0) is RankStatusName.FAILED
    assert status_of(model, 1) is RankStatusName.HUNG


def test_straggler_has_a_step_time_ratio_above_one() -> None:
    model = model_with(A)
    model.ingest(
        A, batch(report(0, 1, step_seconds=1.0), report(1, 1, step_seconds=1.0), report(2, 1, step_seconds=1.5))
    )
    ratios = {r.rank: r.step_time_ratio for r in model.rank_rows()}
    assert ratios == {0: pytest.approx(1.0), 1: pytest.approx(1.0), 2: pytest.approx(1.5)}


def test_loss_history_is_the_mean_over_ranks_that_reported_each_step() -> None:
    model = model_with(A)
    model.ingest(A, batch(report(0, 1, loss=4.0), report(1, 1, loss=2.0), report(0, 2, loss=1.0)))
    assert model.loss_history() == [(1, pytest.approx(3.0)), (2, pytest.approx(1.0))]


def test_restart_from_a_checkpoint_replaces_the_redone_steps() -> None:
    model = model_with(A)
    model.ingest(A, batch(*(report(0, s, loss=5.0) for s in range(1, 11))))
    model.ingest(A, batch(report(0, 6, loss=2.0, restart_count=1)))  # resumed from the step-5 checkpoint
    assert model.rank_rows()[0].step == 6
    assert model.rank_rows()[0].restarts == 1
    assert model.loss_history()[-1] == (6, 2.0)
    model.ingest(A, batch(report(0, 10, loss=5.0)))  # a straggling report from before the restart
    assert model.rank_rows()[0].step == 6


def test_a_rank_restarted_by_its_agent_resets_its_row_before_its_first_step() -> None:
    model = model_with(A)
    model.ingest(A, batch(*(report(0, s) for s in range(1, 40)), statuses=[running(0)]))
    restarted = running(0, telemetry_pb2.RANK_STATE_STARTING)
    restarted.restart_count = 1
    model.ingest(A, batch(statuses=[restarted]))  # the new process attached; its first step is a while off
    row = model.rank_rows()[0]
    assert (row.step, row.status) == (None, RankStatusName.STARTING)


def test_the_first_step_after_a_restart_seen_in_a_status_forgets_the_redone_steps() -> None:
    model = model_with(A)
    model.ingest(A, batch(*(report(0, s, loss=5.0) for s in range(1, 40))))
    restarted = running(0)
    restarted.restart_count = 1
    model.ingest(A, batch(statuses=[restarted]))
    model.ingest(A, batch(report(0, 26, loss=2.0, restart_count=1)))  # resumed from the step-25 checkpoint
    assert model.rank_rows()[0].step == 26
    assert model.loss_history()[-1] == (26, 2.0)
    model.ingest(A, batch(report(0, 39, loss=5.0)))  # a straggling report of the old attempt
    assert model.rank_rows()[0].step == 26


def test_a_dashboard_that_connects_after_restarts_keeps_the_first_steps_it_hears() -> None:
    model = model_with(A)
    model.ingest(A, batch(report(0, 30, restart_count=2), report(0, 31, restart_count=2)))
    assert [s for s, _ in model.loss_history()] == [30, 31]


def test_node_row_without_gpu_says_why() -> None:
    model = model_with(A)
    model.ingest(A, batch(info=node_info("node0", [0], gpu_available=False, gpu_status="no GPU: NVML not found")))
    row = model.node_rows()[0]
    assert (row.gpu_available, row.gpu_status, row.gpu_count) == (False, "no GPU: NVML not found", 0)


def test_node_row_sums_and_averages_its_gpus() -> None:
    model = model_with(A)
    t = batch(info=node_info("node0", [0], gpu_available=True))
    for index, util in enumerate([80.0, 100.0]):
        t.gpu_samples.add(
            node="node0",
            wall_time=NOW,
            index=index,
            utilization_percent=util,
            memory_used_bytes=10,
            memory_total_bytes=40,
            temperature_celsius=60.0 + index,
            power_watts=300.0,
        )
    model.ingest(A, t)
    row = model.node_rows()[0]
    assert row.gpu_count == 2
    assert row.gpu_utilization_percent == pytest.approx(90.0)
    assert row.gpu_memory_percent == pytest.approx(25.0)
    assert row.gpu_temperature_celsius == 61.0
    assert row.gpu_power_watts == 600.0


def test_events_from_all_agents_are_merged_oldest_first() -> None:
    model = ClusterModel([A, B], clock=lambda: NOW, log_connections=False)
    model.ingest(A, batch(events=[telemetry_pb2.Event(wall_time=NOW + 2, kind="late", node="node0")]))
    model.ingest(B, batch(events=[telemetry_pb2.Event(wall_time=NOW + 1, kind="early", node="node1")]))
    assert [e.kind for e in model.events()] == ["early", "late"]


def test_histories_stay_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "STEP_HISTORY", 50)
    monkeypatch.setattr(store, "HOST_HISTORY", 30)
    monkeypatch.setattr(store, "EVENT_HISTORY", 20)
    model = model_with(A)
    for step in range(1, 201):
        model.ingest(
            A,
            batch(
                report(0, step),
                hosts=[telemetry_pb2.HostSample(node="node0", wall_time=NOW + step)],
                events=[telemetry_pb2.Event(wall_time=NOW + step, kind="tick", text=str(step))],
            ),
        )
    assert model.history_sizes() == {
        "steps_per_rank": 50,
        "host_samples_per_node": 30,
        "gpu_samples_per_gpu": 0,
        "events": 20,
    }
    assert model.loss_history()[0][0] == 151  # the newest are kept
    assert model.events()[-1].text == "200"


def test_bounded_series_keeps_the_newest_keys_and_refuses_older_ones() -> None:
    series: store.Bounded[int, str] = store.Bounded(3)
    for key in [5, 1, 3, 4]:
        series.put(key, str(key))
    assert series.keys() == [3, 4, 5]
    assert series.put(2, "2") is False
    assert series.keys() == [3, 4, 5]


_PHASES = {
    "checkpoint_started": telemetry_pb2.CheckpointDetail.PHASE_STARTED,
    "checkpoint": telemetry_pb2.CheckpointDetail.PHASE_SAVED,
    "checkpoint_failed": telemetry_pb2.CheckpointDetail.PHASE_FAILED,
}


def _checkpoint_event(kind: str, step: int, wall_time: float) -> telemetry_pb2.Event:
    detail = telemetry_pb2.CheckpointDetail(phase=_PHASES[kind], step=step)
    event = make_event(kind, detail, wall_time=wall_time, node="node0")
    assert event.kind == kind
    return event


def test_header_shows_a_save_in_progress_then_the_last_checkpoint_and_ignores_a_failed_one() -> None:
    now = [1000.0]
    model = ClusterModel(["a:1"], clock=lambda: now[0])
    assert model.header().checkpoint is None
    model.ingest("a:1", telemetry_pb2.Telemetry(events=[_checkpoint_event("checkpoint_started", 40, 990.0)]))
    assert model.header().checkpoint == "saving step 40"
    model.ingest("a:1", telemetry_pb2.Telemetry(events=[_checkpoint_event("checkpoint", 40, 992.0)]))
    assert model.header().checkpoint is not None and model.header().checkpoint.startswith("step 40, 8")
    failed = [_checkpoint_event("checkpoint_started", 50, 995.0), _checkpoint_event("checkpoint_failed", 50, 996.0)]
    model.ingest("a:1", telemetry_pb2.Telemetry(events=failed))
    assert model.header().checkpoint is not None and model.header().checkpoint.startswith("step 40")


def test_a_job_that_restarts_with_fewer_ranks_is_judged_by_the_ranks_it_has_left() -> None:
    model = model_with(A, B)
    model.ingest(A, batch(*(report(r, s) for r in (0, 1) for s in (1, 2)), info=node_info("node0", [0, 1])))
    model.ingest(B, batch(*(report(r, s) for r in (2, 3) for s in (1, 2)), info=node_info("node1", [2, 3])))
    assert model.header().step == 2
    # node1 is lost; node0's two ranks restart alone from step 1 as a 2-rank job and go on to step 5.
    shrunk = [report(r, s, world_size=2, restart_count=1) for r in (0, 1) for s in range(2, 6)]
    model.ingest(A, batch(*shrunk, info=node_info("node0", [0, 1], world_size=2)))
    model.ingest(B, batch(statuses=[running(2), running(3)], info=node_info("node1", [2, 3])))  # its stale tables
    assert model.header().step == 5
    assert [row.rank for row in model.rank_rows()] == [0, 1]


def test_the_dashboards_own_events_carry_typed_details() -> None:
    model = model_with(A)  # "connected"
    model.set_disconnected(A, "UNAVAILABLE: Connection reset by peer", lost=True)  # "node_lost"
    link = [e for e in model.events() if e.kind in ("connected", "node_lost")]
    assert [(e.kind, e.detail) for e in link] == [
        ("connected", {"address": A, "phase": "PHASE_CONNECTED"}),
        ("node_lost", {"address": A, "phase": "PHASE_LOST"}),
    ]


def test_a_read_only_control_refuses_every_control_call_before_sending() -> None:
    control = DashboardControl(model_with(A), [A], readonly=True)
    assert control.refusal("no restart was sent") == "read-only dashboard (--readonly): no restart was sent"
    for call in (control.restart([A]), control.dump_stacks([A]), control.save_checkpoint([A])):
        with pytest.raises(ReadOnlyError):
            asyncio.run(call)
    with pytest.raises(ReadOnlyError, match="no cancel was sent"):
        asyncio.run(control.cancel_merge(A))
    assert DashboardControl(model_with(A), [A]).refusal("no restart was sent") is None


def _job(phase: int, node: str, wall_time: float) -> telemetry_pb2.Event:
    return make_event(f"job {phase}", telemetry_pb2.JobDetail(phase=phase), node=node, wall_time=wall_time)  # type: ignore[arg-type]


FINISHED = telemetry_pb2.JobDetail.PHASE_FINISHED


def test_a_job_whose_every_node_finished_is_marked_finished_without_an_eta() -> None:
    model = model_with(A, B)
    model.ingest(A, batch(report(0, 5), report(1, 5), info=node_info("node0", [0, 1], total_steps=5)))
    model.ingest(B, batch(report(2, 5), report(3, 5), info=node_info("node1", [2, 3], total_steps=5)))
    model.ingest(A, batch(events=[_job(FINISHED, "node0", NOW + 6)]))
    assert model.header().finished is None  # node1 is still at it
    model.ingest(B, batch(events=[_job(FINISHED, "node1", NOW + 7)]))
    header = model.header()
    assert (header.finished, header.eta_seconds) == (NOW + 7, None)
    tok_s = next(field for field in header_fields(header) if field.label == "tok/s")
    assert tok_s.value == "-"  # no live rate shown for a job that moves no tokens


def test_an_agent_that_stops_after_its_job_finished_is_not_an_error() -> None:
    model = model_with(A)
    model.ingest(A, batch(report(0, 5), info=node_info("node0", [0])))
    model.ingest(A, batch(events=[_job(FINISHED, "node0", NOW + 6)]))
    model.set_disconnected(A, "stream ended (agent stopped?)")
    link = model.events()[-1]
    assert (link.severity, link.text) == ("INFO", "agent stopped after its job finished")
    assert model.agents[A].error == "agent stopped after its job finished"


def test_an_agent_that_stops_while_its_job_runs_is_an_error() -> None:
    model = model_with(A)
    model.ingest(A, batch(report(0, 5), info=node_info("node0", [0])))
    model.set_disconnected(A, "stream ended (agent stopped?)")
    assert model.events()[-1].severity == "ERROR"


def test_a_crash_whose_step_nobody_knows_says_step_unknown_not_step_0() -> None:
    model = model_with(A)
    crash = telemetry_pb2.CrashDetail(signal="SIGKILL")
    model.ingest(A, batch(events=[make_event("rank 1 died", crash, node="node0", rank=1, wall_time=NOW)]))
    assert model.faults()[0].describe().startswith("crash: rank 1 on node0 (SIGKILL), step unknown")


def test_a_rank_only_its_guard_reports_on_is_process_only_until_it_steps() -> None:
    model = model_with(A)
    guarded = running(0)
    guarded.source = telemetry_pb2.RANK_SOURCE_PROCESS
    model.ingest(A, batch(statuses=[guarded]))
    row = model.rank_rows()[0]
    assert (row.process_only, row.status, row.step) == (True, RankStatusName.RUNNING, None)
    model.ingest(A, batch(report(0, 1)))  # the script now calls megascope.api.step()
    assert not model.rank_rows()[0].process_only


def test_a_rank_its_agent_stopped_for_a_restart_shows_stopped_not_failed() -> None:
    model = model_with(A)
    stopped = running(0, telemetry_pb2.RANK_STATE_EXITED)
    stopped.exit_reason = "stopped: restart requested"
    model.ingest(A, batch(report(0, 5), statuses=[stopped]))
    assert model.rank_rows()[0].status is RankStatusName.STOPPED


def _stepping_model(now: list[float]) -> ClusterModel:
    """Two ranks that did steps 1..10 at 1 s a step, seen as they came; the model's clock is ``now[0]``."""
    model = ClusterModel([A], clock=lambda: now[0])
    model.set_connected(A)
    for step in range(1, 11):
        now[0] = NOW + step
        model.ingest(A, batch(report(0, step), report(1, step), statuses=[running(0), running(1)]))
    return model


def test_ranks_that_stop_stepping_for_three_median_steps_are_stalled_before_any_hang_verdict() -> None:
    now = [0.0]
    model = _stepping_model(now)
    now[0] = NOW + 10 + 4.0  # four 1 s steps late, but under the 5 s floor
    assert {row.status for row in model.rank_rows()} == {RankStatusName.RUNNING}
    now[0] = NOW + 10 + 6.0
    assert {row.status for row in model.rank_rows()} == {RankStatusName.STALLED}
    header = model.header()
    assert header.stalled and header.last_step_age == pytest.approx(6.0) and header.eta_seconds is None


def test_a_new_step_ends_the_stall() -> None:
    now = [0.0]
    model = _stepping_model(now)
    now[0] = NOW + 20.0
    model.ingest(A, batch(report(0, 11), report(1, 11)))
    assert {row.status for row in model.rank_rows()} == {RankStatusName.RUNNING}
    assert not model.header().stalled
