"""Faults in the dashboard: the agents' crash, hang, restart and job_failed events in the cluster model, on the
rank rows and the fault line, in the headless summary; and nodes whose agent vanished shown LOST."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from google.protobuf.message import Message
from support.fake_agent import FakeAgent, serve
from support.tui import SIZE, cell, drawn

from megascope.dashboard.app import DashboardApp
from megascope.dashboard.connection import watch_agent
from megascope.dashboard.headless import summarize
from megascope.dashboard.model.cluster import ClusterModel, ConnectionState, RankStatusName
from megascope.dashboard.widgets.bars import FaultBar
from megascope.dashboard.widgets.header import HeaderBar
from megascope.protos.events import make_event
from megascope.protos.megascope.v1 import telemetry_pb2

A, B = "10.0.0.1:50051", "10.0.0.2:50051"
NOW = 1_767_225_600.0
ERROR = telemetry_pb2.Event.SEVERITY_ERROR


def event(
    detail: Message, wall_time: float, node: str, rank: int | None, step: int, text: str = ""
) -> telemetry_pb2.Event:
    message = make_event(text, detail, severity=ERROR, node=node, rank=rank, step=step, wall_time=wall_time)
    message.text = text or message.kind
    return message


def crash(wall_time: float = NOW + 10) -> telemetry_pb2.Event:
    detail = telemetry_pb2.CrashDetail(signal="SIGKILL", detect_seconds=0.42, last_step=37)
    return event(detail, wall_time, "node1", 3, 37)


def restart(wall_time: float = NOW + 25, cause: str = "crash") -> telemetry_pb2.Event:
    causes = {"crash": telemetry_pb2.RestartDetail.CAUSE_CRASH, "manual": telemetry_pb2.RestartDetail.CAUSE_REQUESTED}
    detail = telemetry_pb2.RestartDetail(
        cause=causes[cause], phase=telemetry_pb2.RestartDetail.PHASE_DONE, mttr_seconds=15.25, steps_lost=2,
        resumed_step=35,
    )  # fmt: skip
    return event(detail, wall_time, "node0", 0, 35)


def job_failed(wall_time: float) -> telemetry_pb2.Event:
    detail = telemetry_pb2.JobDetail(phase=telemetry_pb2.JobDetail.PHASE_FAILED, restarts=3)
    return event(detail, wall_time, "node0", None, 37)


def model_with(*agents: str) -> ClusterModel:
    model = ClusterModel(agents, clock=lambda: NOW + 100.0)
    for address in agents:
        model.ingest(address, telemetry_pb2.Telemetry())
        model.set_connected(address)
    return model


def batch(
    *events: telemetry_pb2.Event, statuses: list[telemetry_pb2.RankStatus] | None = None
) -> telemetry_pb2.Telemetry:
    return telemetry_pb2.Telemetry(events=events, rank_statuses=statuses or [])


# -- the model ---------------------------------------------------------------------------------------------


def test_a_crash_and_its_restart_make_one_fault_with_detection_mttr_and_steps_lost() -> None:
    model = model_with(A, B)
    model.ingest(B, batch(crash()))
    assert model.header().last_fault is not None and model.header().last_fault.restart is None
    model.ingest(A, batch(restart()))
    header = model.header()
    assert header.restarts == 1
    fault = header.last_fault
    assert fault is not None and (fault.kind, fault.rank, fault.node, fault.cause) == ("crash", 3, "node1", "SIGKILL")
    assert fault.describe() == (
        "crash: rank 3 on node1 (SIGKILL) after step 37, detected in 0.42s; restarted from step 35, MTTR 15.2s, "
        "2 steps lost"
    )


def test_a_crash_whose_exit_code_has_a_meaning_says_it() -> None:
    model = model_with(A)
    detail = telemetry_pb2.CrashDetail(exit_code=75, cause="could not recover in place; the job restarts")
    model.ingest(A, batch(event(detail, NOW + 10, "node0", 2, 40)))
    [fault] = model.faults()
    assert fault.cause == "exit code 75: could not recover in place; the job restarts"


def test_a_restart_that_arrives_before_its_crash_still_ends_it() -> None:
    model = model_with(A, B)
    model.ingest(A, batch(restart()))  # node0's back-fill came first
    model.ingest(B, batch(crash()))
    [fault] = model.faults()
    assert fault.restart is not None and fault.restart.steps_lost == 2


def test_a_replayed_restart_event_is_counted_once() -> None:
    model = model_with(A)
    model.ingest(A, batch(restart()))
    model.ingest(A, batch(restart()))  # a reconnect replays the back-fill
    assert model.header().restarts == 1


def test_a_failed_ranks_row_says_how_it_ended() -> None:
    model = model_with(A)
    failed = telemetry_pb2.RankStatus(rank=0, pid=100, state=telemetry_pb2.RANK_STATE_FAILED, exit_reason="SIGKILL")
    hung = telemetry_pb2.RankStatus(rank=1, pid=101, state=telemetry_pb2.RANK_STATE_HUNG)
    model.ingest(A, batch(statuses=[failed, hung]))
    rows = {row.rank: row for row in model.rank_rows()}
    assert (rows[0].status, rows[0].exit_reason) == (RankStatusName.FAILED, "SIGKILL")
    assert rows[1].status is RankStatusName.HUNG


def test_an_agent_whose_stream_breaks_is_lost_and_one_that_says_goodbye_is_disconnected() -> None:
    model = model_with(A, B)
    model.set_disconnected(A, "UNAVAILABLE: Connection reset by peer", lost=True)
    model.set_disconnected(A, "UNAVAILABLE: failed to connect to all addresses", lost=True)  # a retry fails
    model.set_disconnected(B, "stream ended (agent stopped?)")
    assert [model.agents[a].state for a in (A, B)] == [ConnectionState.LOST, ConnectionState.DISCONNECTED]
    assert [(e.node, e.kind) for e in model.events()[-2:]] == [(A, "node_lost"), (B, "disconnected")]


def test_an_agent_never_reached_is_disconnected_not_lost() -> None:
    model = ClusterModel([A])
    model.set_disconnected(A, "UNAVAILABLE: failed to connect to all addresses", lost=True)
    assert model.agents[A].state is ConnectionState.DISCONNECTED


async def test_an_agent_that_goes_silent_is_lost_after_the_heartbeat_window() -> None:
    fake = FakeAgent(telemetry_pb2.NodeInfo(node="node0", ranks=[0]), interval=0.05)
    server, address = await serve(fake)
    model = ClusterModel([address])
    task = asyncio.create_task(watch_agent(model, address, stale_after=0.5))
    try:
        deadline = time.monotonic() + 10
        while model.agents[address].state is not ConnectionState.CONNECTED:
            assert time.monotonic() < deadline, "never connected"
            await asyncio.sleep(0.02)
        fake.interval = 3600.0  # frozen: the connection stays open, nothing more comes
        silent = time.monotonic()
        while model.agents[address].state is not ConnectionState.LOST:
            assert time.monotonic() - silent < 5, "never marked LOST"
            await asyncio.sleep(0.02)
        assert model.agents[address].error == "no telemetry for 0.5s"
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.stop(None)


# -- the TUI -----------------------------------------------------------------------------------------------


async def test_the_main_screen_shows_the_last_fault_the_restart_count_and_how_a_rank_failed() -> None:
    model = model_with(A, B)
    failed = telemetry_pb2.RankStatus(rank=3, pid=103, state=telemetry_pb2.RANK_STATE_FAILED, exit_reason="SIGKILL")
    model.ingest(B, batch(crash(), statuses=[failed]))
    model.ingest(A, batch(restart()))
    app = DashboardApp(model=model)
    async with app.run_test(size=SIZE) as pilot:
        await drawn(app, pilot)
        bar = app.screen.query_one(FaultBar)
        assert bar.display and bar.text.plain.startswith(" CRASH! crash: rank 3 on node1 (SIGKILL) after step 37")
        assert "MTTR 15.2s, 2 steps lost" in bar.text.plain and "(job restarts: 1)" in bar.text.plain
        assert "restarts 1!" in app.screen.query_one(HeaderBar).text.plain
        assert cell(app, "ranks", "3", "status") == "FAILED SIGKILL"


async def test_the_fault_line_says_when_the_job_gave_up() -> None:
    model = model_with(A)
    model.ingest(A, batch(crash(), job_failed(NOW + 20)))
    app = DashboardApp(model=model)
    async with app.run_test(size=SIZE) as pilot:
        await drawn(app, pilot)
        assert app.screen.query_one(FaultBar).text.plain == " JOB FAILED!! job_failed"


# -- the headless summary ----------------------------------------------------------------------------------


def test_the_headless_summary_counts_restart_events_and_lists_the_faults() -> None:
    model = model_with(A, B)
    report = telemetry_pb2.StepReport(rank=0, step=40, restart_count=5, step_seconds=1.0, wall_time=NOW + 30)
    model.ingest(A, telemetry_pb2.Telemetry(step_reports=[report]))  # torch elastic's count is not the job's
    model.ingest(B, batch(crash()))
    model.ingest(A, batch(restart(), restart(NOW + 60, cause="manual")))
    cluster = SimpleNamespace(nodes=2, run_dir=Path("runs/x"))
    summary = summarize(model, cluster, None, [0, 0])  # type: ignore[arg-type]
    assert summary["restarts"] == 2
    [fault] = summary["faults"]
    assert {k: fault[k] for k in ("kind", "rank", "node", "step", "detect_seconds", "cause")} == {
        "kind": "crash", "rank": 3, "node": "node1", "step": 37, "detect_seconds": 0.42, "cause": "SIGKILL",
    }  # fmt: skip
    assert (fault["mttr_seconds"], fault["steps_lost"], fault["resumed_step"]) == (15.25, 2, 35)
    assert [(r["cause"], r["steps_lost"]) for r in summary["restart_details"]] == [("crash", 2), ("manual", 2)]
    json.dumps(summary)
