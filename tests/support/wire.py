"""Builders of wire messages for tests: one step report, rank status and telemetry batch.

Every test that needs a step report builds it here, overriding what it cares about, so the schema is spelled
once on the test side (as the engine spells it once on the other).
"""

from __future__ import annotations

import time

from megascope.protos.megascope.v1 import telemetry_pb2


def step_report(rank: int = 0, step: int = 1, **fields: object) -> telemetry_pb2.StepReport:
    """Rank ``rank`` of a 2-rank job on node0 finished ``step`` now, a 0.2 s step (no phase breakdown unless a
    test gives one)."""
    values: dict[str, object] = {
        "node": "node0",
        "rank": rank,
        "world_size": 2,
        "step": step,
        "loss": 3.0 - 0.01 * step,
        "tokens": 512,
        "step_seconds": 0.2,
        "tokens_per_second": 2560.0,
        "wall_time": time.time(),
    }
    values.update(fields)
    return telemetry_pb2.StepReport(**values)  # type: ignore[arg-type]


def running(rank: int, state: int = telemetry_pb2.RANK_STATE_RUNNING) -> telemetry_pb2.RankStatus:
    """The agent's view of a rank: ``state`` (running by default), pid 100 + rank."""
    return telemetry_pb2.RankStatus(rank=rank, pid=100 + rank, state=state)  # type: ignore[arg-type]


def batch(
    *reports: telemetry_pb2.StepReport,
    info: telemetry_pb2.NodeInfo | None = None,
    statuses: list[telemetry_pb2.RankStatus] | None = None,
    events: list[telemetry_pb2.Event] | None = None,
    hosts: list[telemetry_pb2.HostSample] | None = None,
) -> telemetry_pb2.Telemetry:
    """One Watch batch of these parts."""
    telemetry = telemetry_pb2.Telemetry(
        step_reports=reports, rank_statuses=statuses or [], events=events or [], host_samples=hosts or []
    )
    if info is not None:
        telemetry.node_info.CopyFrom(info)
    return telemetry
