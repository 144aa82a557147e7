"""Checks of what comes in over the wire, before anything acts on it. Pure: no gRPC calls, no state.

Input from the wire is never trusted. Every check raises :class:`InvalidMessage` with a text that names the
field (``step_report.step_seconds: ...``); the servicers (agent/server.py) turn it into ``INVALID_ARGUMENT``.

What a rank says is checked against what the agent launched (:class:`Launched`): its rank within the world the
agent launched, one rank per stream, a pid the agent started, wall times between the agent's start and now (a
small skew allowed). Text meant for people is trimmed to a size, with a marker, rather than refused
(:func:`trim_event`, :func:`trim_exit_report`): a rank's long traceback is still worth seeing.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from megascope.protos.megascope.v1 import agent_pb2, telemetry_pb2, worker_pb2

MAX_DUMP_STACKS_SECONDS = 60.0
MAX_COMMAND_ID_CHARS = 200
MAX_TEXT_BYTES = 4096
"""An event's text (and any one string of its detail) is trimmed to this many bytes."""
MAX_NAME_CHARS = 128
"""A name from the wire (an event's kind, a node, a run id, a signal): longer is refused."""
MAX_PATH_CHARS = 4096
MAX_LIST_ITEMS = 64
"""Items of a repeated field of an event's detail (log lines, ranks, measures) kept: the first and last halves."""
MAX_LOG_LINES = 100
"""Lines of an exit report's log tail kept: the first and the last halves."""
MAX_LINE_BYTES = 1024
"""One log line is trimmed to this many bytes."""
MAX_COLLECTIVES = 4096
"""Collectives of one step report."""
MAX_WORLD_SIZE = 1 << 16
MAX_SCALARS = 32
"""A step report's own scalars (``StepReport.scalars``) kept: the first, in name order."""
MAX_SCALAR_NAME_CHARS = 64
MAX_PROGRESS_LINES = 256
"""Output lines one guard progress message may carry (the guard sends at most this many, and counts the rest)."""
MAX_RANK_LOG_LINES = 2000
"""GetRankLog answers at most this many lines (what the agent keeps of a rank, at most)."""
DEFAULT_RANK_LOG_LINES = 200
MAX_OUTPUT_LINES = 1 << 53
"""A guard's count of its rank's output lines: more than any run writes, and exact as a double."""
MAX_CPU_SECONDS = 1e10
"""A guard's CPU seconds of its rank's process tree: three centuries of a core, a bound for garbage only."""
CLOCK_SKEW_SECONDS = 30.0
"""A wall time from a rank may be this far ahead of the agent's clock (or behind its start)."""
MAX_ERROR_CHARS = 1000
"""Refusal messages are cut to this: gRPC drops a status whose message is too large, and the caller sees only
"Stream removed" instead of the reason."""


class InvalidMessage(ValueError):
    """A message from the wire that breaks the contract; the text names the field."""

    def __init__(self, text: str) -> None:
        super().__init__(short(text))


def short(text: str, most: int = MAX_ERROR_CHARS) -> str:
    """``text``, cut to ``most`` characters with a marker."""
    if len(text) <= most:
        return text
    marker = f" ... [cut: {len(text)} chars in all]"
    return text[: most - len(marker)] + marker


def _yes(pid: int) -> bool:
    return True


def _no(pid: int) -> bool:
    return False


def _unknown(pid: int) -> tuple[int, int] | None:
    return None


@dataclass(frozen=True)
class Launched:
    """What the agent launched: every claim a rank makes is checked against it."""

    started: float = 0.0
    """The agent's start, Unix seconds: no rank reports anything from before it (0: not checked)."""
    world_sizes: tuple[int, int] | None = None
    """The smallest and largest world size of the job launched (elastic: MIN..MAX nodes); None: not known."""
    local_world_size: int | None = None
    """Ranks per node launched; None: not known."""
    owns_pid: Callable[[int], bool] = _yes
    """Whether a pid is a process of this agent's job (the agent: one of its descendants)."""
    rank_of: Callable[[int], tuple[int, int] | None] = _unknown
    """The rank and world size a process was launched as (the agent: from its environment); None: unknown."""
    running: Callable[[int], bool] = _no
    """Whether a pid is a live process of this job: an exit report about it is false (the agent: a descendant)."""
    stacks_dir: str | None = None
    """The absolute directory of the ranks' stack files; None: not known."""

    def world_text(self) -> str:
        if self.world_sizes is None:
            return f"at most {MAX_WORLD_SIZE}"
        low, high = self.world_sizes
        return str(low) if low == high else f"between {low} and {high}"


def check_wall_time(value: float, name: str, launched: Launched, now: float) -> None:
    """A wall time from a rank: 0 (not given), or between the agent's start and now, give or take the skew."""
    if not math.isfinite(value) or value < 0:
        raise InvalidMessage(f"{name}: must be a finite number >= 0, got {value}")
    if value == 0:
        return
    if value > now + CLOCK_SKEW_SECONDS:
        raise InvalidMessage(f"{name}: {value:.3f} is {value - now:.0f}s in the future (agent clock {now:.3f})")
    if launched.started and value < launched.started - CLOCK_SKEW_SECONDS:
        raise InvalidMessage(f"{name}: {value:.3f} is before this agent started ({launched.started:.3f})")


def _name(value: str, name: str) -> None:
    if len(value) > MAX_NAME_CHARS:
        raise InvalidMessage(f"{name}: longer than {MAX_NAME_CHARS} characters ({len(value)})")


def _trim_text(text: str, most: int) -> str:
    data = text.encode()
    if len(data) <= most:
        return text
    marker = f" ... [{len(data) - most} bytes trimmed]"
    return data[: max(0, most - len(marker))].decode(errors="ignore") + marker


def _trim_list(items: list[str], most: int, line_bytes: int) -> list[str]:
    if len(items) > most:
        half = most // 2
        items = [*items[:half], f"[... {len(items) - 2 * half} lines trimmed]", *items[-half:]]
    return [_trim_text(item, line_bytes) for item in items]


def _trim_strings(message: Message) -> None:
    """Every string of ``message`` (and of the messages in it) trimmed; every repeated string shortened."""
    for field, value in message.ListFields():
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            for item in value if field.is_repeated else [value]:
                _trim_strings(item)
        elif field.type == FieldDescriptor.TYPE_STRING:
            if field.is_repeated:
                trimmed = _trim_list(list(value), MAX_LIST_ITEMS, MAX_LINE_BYTES)
                del value[:]
                value.extend(trimmed)
            else:
                setattr(message, field.name, _trim_text(value, MAX_TEXT_BYTES))
        elif field.is_repeated and len(value) > MAX_LIST_ITEMS:
            del value[MAX_LIST_ITEMS:]


def _finite_non_negative(message: object, prefix: str, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(message, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidMessage(f"{prefix}.{name}: must be a finite number >= 0, got {value}")


# --- WorkerService.Attach ---------------------------------------------------------------------------------


def validate_hello(hello: worker_pb2.Hello, launched: Launched | None = None) -> None:
    """A rank's Hello: its world is the one launched, its rank inside it, its pid a process of this job."""
    launched = launched or Launched()
    if hello.world_size < 1:
        raise InvalidMessage(f"hello.world_size: must be at least 1, got {hello.world_size}")
    low, high = launched.world_sizes or (1, MAX_WORLD_SIZE)
    if not low <= hello.world_size <= high:
        raise InvalidMessage(
            f"hello.world_size: {hello.world_size}, but this agent launched a world of {launched.world_text()}"
        )
    if not 0 <= hello.rank < hello.world_size:
        raise InvalidMessage(f"hello.rank: {hello.rank} is outside [0, world_size={hello.world_size})")
    if hello.local_rank < 0 or hello.pid < 0:
        raise InvalidMessage("hello.local_rank and hello.pid must be >= 0")
    if launched.local_world_size is not None and hello.local_rank >= launched.local_world_size:
        raise InvalidMessage(
            f"hello.local_rank: {hello.local_rank}, but this agent launched {launched.local_world_size} rank(s)"
        )
    if hello.restart_count < 0:
        raise InvalidMessage(f"hello.restart_count: must be >= 0, got {hello.restart_count}")
    if hello.role not in worker_pb2.WorkerRole.values():
        raise InvalidMessage(f"hello.role: unknown value {hello.role}")
    if hello.role == worker_pb2.WORKER_ROLE_GUARD and hello.stack_file:
        raise InvalidMessage("hello.stack_file: a rank guard has none (its rank's stacks are read with py-spy)")
    for name in ("node", "run_id"):
        _name(getattr(hello, name), f"hello.{name}")
    if len(hello.stack_file) > MAX_PATH_CHARS:
        raise InvalidMessage(f"hello.stack_file: longer than {MAX_PATH_CHARS} characters")
    if hello.stack_file and launched.stacks_dir is not None:
        path = os.path.normpath(hello.stack_file)
        if not os.path.isabs(path) or os.path.dirname(path) != os.path.normpath(launched.stacks_dir):
            raise InvalidMessage(f"hello.stack_file: must be a file in {launched.stacks_dir}, got {hello.stack_file!r}")
    if not launched.owns_pid(hello.pid):
        raise InvalidMessage(f"hello.pid: {hello.pid} is not a process this agent launched")
    launched_as = launched.rank_of(hello.pid)
    if launched_as is not None and launched_as != (hello.rank, hello.world_size):
        rank, world = launched_as
        raise InvalidMessage(
            f"hello.rank: process {hello.pid} was launched as rank {rank} of {world}, "
            f"not rank {hello.rank} of {hello.world_size}"
        )


def validate_heartbeat(heartbeat: telemetry_pb2.Heartbeat, hello: worker_pb2.Hello, launched: Launched,
                       now: float) -> None:  # fmt: skip
    """A heartbeat on a rank's stream: about that rank and that process."""
    if heartbeat.rank != hello.rank:
        raise InvalidMessage(f"heartbeat.rank: {heartbeat.rank} does not match this stream's rank {hello.rank}")
    if heartbeat.pid and heartbeat.pid != hello.pid:
        raise InvalidMessage(f"heartbeat.pid: {heartbeat.pid} does not match this stream's pid {hello.pid}")
    if heartbeat.step < 0 or heartbeat.completed_step < 0 or heartbeat.collectives_issued < 0:
        raise InvalidMessage("heartbeat.step, .completed_step and .collectives_issued must be >= 0")
    _name(heartbeat.node, "heartbeat.node")
    check_wall_time(heartbeat.wall_time, "heartbeat.wall_time", launched, now)


def validate_step_report(
    report: telemetry_pb2.StepReport,
    rank: int,
    hello: worker_pb2.Hello | None = None,
    launched: Launched | None = None,
    now: float | None = None,
) -> None:
    if report.rank != rank:
        raise InvalidMessage(f"step_report.rank: {report.rank} does not match this stream's rank {rank}")
    if hello is not None and report.world_size and report.world_size != hello.world_size:
        raise InvalidMessage(
            f"step_report.world_size: {report.world_size} does not match this stream's world size {hello.world_size}"
        )
    if len(report.collectives) > MAX_COLLECTIVES:
        raise InvalidMessage(f"step_report.collectives: more than {MAX_COLLECTIVES} ({len(report.collectives)})")
    _name(report.node, "step_report.node")
    if now is not None:
        check_wall_time(report.wall_time, "step_report.wall_time", launched or Launched(), now)
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


def trim_scalars(report: telemetry_pb2.StepReport) -> telemetry_pb2.StepReport:
    """The report with its own scalars cut to what the agent keeps: finite values, names of at most
    :data:`MAX_SCALAR_NAME_CHARS` characters, at most :data:`MAX_SCALARS` of them (the first by name). A script's
    extra scalars are never a reason to lose its step."""
    scalars = report.scalars
    keep = sorted(
        name for name, value in scalars.items() if 0 < len(name) <= MAX_SCALAR_NAME_CHARS and math.isfinite(value)
    )[:MAX_SCALARS]
    if len(keep) != len(scalars):
        kept = {name: scalars[name] for name in keep}
        scalars.clear()
        scalars.update(kept)
    return report


def validate_progress(progress: worker_pb2.ProcessProgress, launched: Launched | None = None,
                      now: float | None = None) -> None:  # fmt: skip
    """A rank guard's progress: counts that are counts, a time that is now."""
    if not 0 <= progress.output_lines <= MAX_OUTPUT_LINES:
        raise InvalidMessage(f"progress.output_lines: must be in [0, {MAX_OUTPUT_LINES}], got {progress.output_lines}")
    if not math.isfinite(progress.cpu_seconds) or not 0 <= progress.cpu_seconds <= MAX_CPU_SECONDS:
        raise InvalidMessage(f"progress.cpu_seconds: must be in [0, {MAX_CPU_SECONDS:g}], got {progress.cpu_seconds}")
    if progress.restart_count < 0:
        raise InvalidMessage(f"progress.restart_count: must be >= 0, got {progress.restart_count}")
    if len(progress.lines) > MAX_PROGRESS_LINES:
        raise InvalidMessage(f"progress.lines: at most {MAX_PROGRESS_LINES} per message, got {len(progress.lines)}")
    if not 0 <= progress.lines_dropped <= MAX_OUTPUT_LINES:
        raise InvalidMessage(
            f"progress.lines_dropped: must be in [0, {MAX_OUTPUT_LINES}], got {progress.lines_dropped}"
        )
    for i, line in enumerate(progress.lines):
        if line.stream not in (telemetry_pb2.LOG_STREAM_STDOUT, telemetry_pb2.LOG_STREAM_STDERR):
            raise InvalidMessage(f"progress.lines[{i}].stream: must be LOG_STREAM_STDOUT or LOG_STREAM_STDERR")
    if now is not None:
        check_wall_time(progress.wall_time, "progress.wall_time", launched or Launched(), now)


def trim_progress_lines(progress: worker_pb2.ProcessProgress) -> list[telemetry_pb2.LogLine]:
    """The lines of a valid progress as the agent keeps them: each cut to :data:`MAX_LINE_BYTES` (a longer one is
    marked), numbered by the agent, not the sender."""
    return [
        telemetry_pb2.LogLine(text=_trim_text(line.text, MAX_LINE_BYTES), stream=line.stream) for line in progress.lines
    ]


def validate_event(
    event: telemetry_pb2.Event, rank: int | None = None, launched: Launched | None = None, now: float | None = None
) -> None:
    if event.severity not in telemetry_pb2.Event.Severity.values():
        raise InvalidMessage(f"event.severity: unknown value {event.severity}")
    if not event.kind and event.WhichOneof("detail") is None:
        raise InvalidMessage("event.kind: must not be empty for an event without a detail")
    _name(event.kind, "event.kind")
    _name(event.node, "event.node")
    if rank is not None and event.HasField("rank") and event.rank != rank:
        raise InvalidMessage(f"event.rank: {event.rank} does not match this stream's rank {rank}")
    if now is not None:
        check_wall_time(event.wall_time, "event.wall_time", launched or Launched(), now)


def trim_event(event: telemetry_pb2.Event) -> telemetry_pb2.Event:
    """The event with its text and every string of its detail trimmed to size (with a marker saying so)."""
    _trim_strings(event)
    return event


def validate_finished(finished: worker_pb2.RankFinished) -> None:
    if finished.steps < 0:
        raise InvalidMessage(f"finished.steps: must be >= 0, got {finished.steps}")


def validate_failure(
    report: worker_pb2.ExitReport, rank: int, pid: int, launched: Launched | None = None, now: float | None = None
) -> None:
    """A rank's own failure report, on its stream: it must be about that rank and that process."""
    if report.rank != rank:
        raise InvalidMessage(f"failure.rank: {report.rank} does not match this stream's rank {rank}")
    if report.pid and report.pid != pid:
        raise InvalidMessage(f"failure.pid: {report.pid} does not match this stream's pid {pid}")
    if not math.isfinite(report.wall_time) or report.wall_time < 0:
        raise InvalidMessage(f"failure.wall_time: must be a finite number >= 0, got {report.wall_time}")
    _exit_fields(report, "failure")
    if now is not None:
        check_wall_time(report.wall_time, "failure.wall_time", launched or Launched(), now)


def _exit_fields(report: worker_pb2.ExitReport, prefix: str) -> None:
    if report.local_rank < 0 or report.restart_count < 0:
        raise InvalidMessage(f"{prefix}.local_rank and {prefix}.restart_count must be >= 0")
    _name(report.signal, f"{prefix}.signal")


def trim_exit_report(report: worker_pb2.ExitReport) -> worker_pb2.ExitReport:
    """The report with its log tail cut to :data:`MAX_LOG_LINES` lines (the first and last) of bounded length, and
    its cause to one such line."""
    trimmed = _trim_list(list(report.log_tail), MAX_LOG_LINES, MAX_LINE_BYTES)
    del report.log_tail[:]
    report.log_tail.extend(trimmed)
    report.cause = _trim_text(report.cause, MAX_LINE_BYTES)
    return report


def validate_self_check(result: worker_pb2.SelfCheckResult) -> None:
    detail = result.detail
    if len(detail.slow_measures) > MAX_LIST_ITEMS:
        raise InvalidMessage(f"self_check.detail.slow_measures: more than {MAX_LIST_ITEMS}")
    if detail.verdict not in telemetry_pb2.SelfCheckDetail.Verdict.values():
        raise InvalidMessage(f"self_check.detail.verdict: unknown value {detail.verdict}")
    _finite_non_negative(detail, "self_check.detail", ("seconds",))


def validate_command_ack(ack: worker_pb2.CommandAck) -> None:
    if not ack.command_id:
        raise InvalidMessage("command_ack.command_id: must name the command it answers")
    if len(ack.command_id) > MAX_COMMAND_ID_CHARS:
        raise InvalidMessage(f"command_ack.command_id: longer than {MAX_COMMAND_ID_CHARS} characters")


# --- WorkerService.ReportExit ------------------------------------------------------------------------------


def validate_exit_report(report: worker_pb2.ExitReport, launched: Launched | None = None, now: float | None = None,
                         world_size: int = 0) -> None:  # fmt: skip
    """A rank guard's report of how its rank ended. The rank may have died before it said Hello, and its process
    is gone (its pid cannot be checked any more): its rank must be in the world launched (``world_size``: the one
    the ranks reported, when known), its time sane."""
    launched = launched or Launched()
    if report.rank < 0:
        raise InvalidMessage(f"report.rank: must be >= 0, got {report.rank}")
    if report.pid <= 0:
        raise InvalidMessage(f"report.pid: must name the rank's process, got {report.pid}")
    world = world_size or (launched.world_sizes[1] if launched.world_sizes else MAX_WORLD_SIZE)
    if report.rank >= world:
        raise InvalidMessage(f"report.rank: {report.rank} is outside the world this agent launched ({world} ranks)")
    if launched.local_world_size is not None and report.local_rank >= launched.local_world_size:
        raise InvalidMessage(
            f"report.local_rank: {report.local_rank}, but this agent launched {launched.local_world_size} rank(s)"
        )
    if not math.isfinite(report.wall_time):
        raise InvalidMessage("report.wall_time: must be a finite number")
    _exit_fields(report, "report")
    if now is not None:
        check_wall_time(report.wall_time, "report.wall_time", launched, now)
    if launched.running(report.pid):
        raise InvalidMessage(f"report.pid: process {report.pid} is still running: it has not exited")


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


def rank_log_lines(request: agent_pb2.GetRankLogRequest, world_size: int) -> int:
    """How many lines a GetRankLog answer holds at most; refuses a rank outside the job (``world_size``: the node's
    view of it, 0 when no rank has started)."""
    if request.rank < 0:
        raise InvalidMessage(f"rank: must be >= 0, got {request.rank}")
    if world_size > 0 and request.rank >= world_size:
        raise InvalidMessage(f"rank: the job has ranks 0 to {world_size - 1}, got {request.rank}")
    if not 0 <= request.max_lines <= MAX_RANK_LOG_LINES:
        raise InvalidMessage(
            f"max_lines: must be in [0, {MAX_RANK_LOG_LINES}] (0: {DEFAULT_RANK_LOG_LINES}), got {request.max_lines}"
        )
    return request.max_lines or DEFAULT_RANK_LOG_LINES


def dump_stacks_timeout(request: agent_pb2.DumpStacksRequest, default: float) -> float:
    """The request's timeout, ``default`` for 0; it must be in (0, 60] seconds."""
    timeout = request.timeout_seconds or default
    if not math.isfinite(timeout) or not 0 < timeout <= MAX_DUMP_STACKS_SECONDS:
        raise InvalidMessage(
            f"timeout_seconds: must be in (0, {MAX_DUMP_STACKS_SECONDS:g}], got {request.timeout_seconds}"
        )
    return timeout
