"""Checks of what comes in over the wire, before anything acts on it. Pure: no gRPC calls, no state.

Input from the wire is never trusted. Every check raises :class:`InvalidMessage` with a text that names the
field (``step_report.step_seconds: ...``); the servicers (agent/server.py) turn it into ``INVALID_ARGUMENT``.
"""

from __future__ import annotations

import math

from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

MAX_DUMP_STACKS_SECONDS = 60.0
MAX_COMMAND_ID_CHARS = 200


class InvalidMessage(ValueError):
    """A message from the wire that breaks the contract; the text names the field."""


def _finite_non_negative(message: object, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(message, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidMessage(f"{prefix}.{name}: must be a finite number >= 0, got {value}")


# --- WorkerService.Attach ---------------------------------------------------------------------------------


def validate_hello(hello: worker_pb2.Hello) -> None:
    if hello.world_size < 1:
        raise InvalidMessage(f"hello.world_size: must be at least 1, got {hello.world_size}")
    if not 0 <= hello.rank < hello.world_size:
        raise InvalidMessage(f"hello.rank: {hello.rank} is outside [0, world_size={hello.world_size})")
    if hello.local_rank < 0 or hello.pid < 0:
        raise InvalidMessage("hello.local_rank and hello.pid must be >= 0")


def validate_step_report(report: telemetry_pb2.StepReport, rank: int) -> None:
    if report.rank != rank:
        raise InvalidMessage(f"step_report.rank: {report.rank} does not match this stream's rank {rank}")
    if report.step < 0 or report.tokens < 0:
        raise InvalidMessage(f"step_report.step and .tokens must be >= 0, got {report.step} and {report.tokens}")
    _finite_non_negative(
        report,
        "step_report",
        ("step_seconds", "data_wait_seconds", "forward_seconds", "backward_seconds", "comm_wait_seconds",
         "optimizer_seconds", "other_seconds", "tokens_per_second", "model_flops", "gc_pause_seconds", "cpu_seconds",
         "device_compute_seconds"),
    )  # fmt: skip
    for index, collective in enumerate(report.collectives):
        _finite_non_negative(collective, f"step_report.collectives[{index}]", ("duration_seconds", "blocked_seconds"))


def validate_event(event: telemetry_pb2.Event) -> None:
    if event.severity not in telemetry_pb2.Event.Severity.values():
        raise InvalidMessage(f"event.severity: unknown value {event.severity}")
    if not event.kind and event.WhichOneof("detail") is None:
        raise InvalidMessage("event.kind: must not be empty for an event without a detail")


def validate_finished(finished: worker_pb2.RankFinished) -> None:
    if finished.steps < 0:
        raise InvalidMessage(f"finished.steps: must be >= 0, got {finished.steps}")


def validate_failure(report: worker_pb2.ExitReport, rank: int, pid: int) -> None:
    """A rank's own failure report, on its stream: it must be about that rank and that process."""
    if report.rank != rank:
        raise InvalidMessage(f"failure.rank: {report.rank} does not match this stream's rank {rank}")
    if report.pid and report.pid != pid:
        raise InvalidMessage(f"failure.pid: {report.pid} does not match this stream's pid {pid}")
    if not math.isfinite(report.wall_time) or report.wall_time < 0:
        raise InvalidMessage(f"failure.wall_time: must be a finite number >= 0, got {report.wall_time}")


def validate_self_check(result: worker_pb2.SelfCheckResult) -> None:
    detail = result.detail
    if detail.verdict not in telemetry_pb2.SelfCheckDetail.Verdict.values():
        raise InvalidMessage(f"self_check.detail.verdict: unknown value {detail.verdict}")
    _finite_non_negative(detail, "self_check.detail", ("seconds",))


def validate_command_ack(ack: worker_pb2.CommandAck) -> None:
    if not ack.command_id:
        raise InvalidMessage("command_ack.command_id: must name the command it answers")
    if len(ack.command_id) > MAX_COMMAND_ID_CHARS:
        raise InvalidMessage(f"command_ack.command_id: longer than {MAX_COMMAND_ID_CHARS} characters")


# --- WorkerService.ReportExit ------------------------------------------------------------------------------


def validate_exit_report(report: worker_pb2.ExitReport) -> None:
    if report.rank < 0 or report.pid < 0:
        raise InvalidMessage("report.rank and report.pid must be >= 0")
    if not math.isfinite(report.wall_time):
        raise InvalidMessage("report.wall_time: must be a finite number")


# --- AgentService ------------------------------------------------------------------------------------------


def validate_step_request(step: int) -> None:
    """SaveCheckpoint and Restart: 0 lets the agent choose; a negative step is nobody's."""
    if step < 0:
        raise InvalidMessage(f"step: must be >= 0, got {step}")


def validate_watch(request: agent_pb2.WatchRequest) -> None:
    seconds = request.backfill_seconds
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidMessage(f"backfill_seconds: must be >= 0, got {seconds}")


def validate_get_events(request: agent_pb2.GetEventsRequest) -> None:
    if request.limit < 0:
        raise InvalidMessage(f"limit: must be >= 0, got {request.limit}")
    if not math.isfinite(request.since_wall_time):
        raise InvalidMessage("since_wall_time: must be a finite number")


def dump_stacks_timeout(request: agent_pb2.DumpStacksRequest, default: float) -> float:
    """The request's timeout, ``default`` for 0; it must be in (0, 60] seconds."""
    timeout = request.timeout_seconds or default
    if not math.isfinite(timeout) or not 0 < timeout <= MAX_DUMP_STACKS_SECONDS:
        raise InvalidMessage(
            f"timeout_seconds: must be in (0, {MAX_DUMP_STACKS_SECONDS:g}], got {request.timeout_seconds}"
        )
    return timeout
