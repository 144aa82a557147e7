from megascope.protos.megascope.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WorkerRole(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_ROLE_UNSPECIFIED: _ClassVar[WorkerRole]
    WORKER_ROLE_RANK: _ClassVar[WorkerRole]
    WORKER_ROLE_GUARD: _ClassVar[WorkerRole]

class CommandKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMMAND_KIND_UNSPECIFIED: _ClassVar[CommandKind]
    COMMAND_KIND_CHECKPOINT: _ClassVar[CommandKind]
    COMMAND_KIND_STOP: _ClassVar[CommandKind]
WORKER_ROLE_UNSPECIFIED: WorkerRole
WORKER_ROLE_RANK: WorkerRole
WORKER_ROLE_GUARD: WorkerRole
COMMAND_KIND_UNSPECIFIED: CommandKind
COMMAND_KIND_CHECKPOINT: CommandKind
COMMAND_KIND_STOP: CommandKind

class ExitReport(_message.Message):
    __slots__ = ("rank", "local_rank", "pid", "exit_code", "signal", "wall_time", "log_tail", "restart_count", "cause")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    local_rank: int
    pid: int
    exit_code: int
    signal: str
    wall_time: float
    log_tail: _containers.RepeatedScalarFieldContainer[str]
    restart_count: int
    cause: str
    def __init__(self, rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., pid: _Optional[int] = ..., exit_code: _Optional[int] = ..., signal: _Optional[str] = ..., wall_time: _Optional[float] = ..., log_tail: _Optional[_Iterable[str]] = ..., restart_count: _Optional[int] = ..., cause: _Optional[str] = ...) -> None: ...

class ReportExitRequest(_message.Message):
    __slots__ = ("report",)
    REPORT_FIELD_NUMBER: _ClassVar[int]
    report: ExitReport
    def __init__(self, report: _Optional[_Union[ExitReport, _Mapping]] = ...) -> None: ...

class ReportExitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Hello(_message.Message):
    __slots__ = ("rank", "local_rank", "world_size", "pid", "node", "restart_count", "run_id", "stack_file", "role")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STACK_FILE_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    local_rank: int
    world_size: int
    pid: int
    node: str
    restart_count: int
    run_id: str
    stack_file: str
    role: WorkerRole
    def __init__(self, rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., world_size: _Optional[int] = ..., pid: _Optional[int] = ..., node: _Optional[str] = ..., restart_count: _Optional[int] = ..., run_id: _Optional[str] = ..., stack_file: _Optional[str] = ..., role: _Optional[_Union[WorkerRole, str]] = ...) -> None: ...

class ProcessProgress(_message.Message):
    __slots__ = ("output_lines", "cpu_seconds", "wall_time", "restart_count", "lines", "lines_dropped")
    OUTPUT_LINES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    LINES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    output_lines: int
    cpu_seconds: float
    wall_time: float
    restart_count: int
    lines: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.LogLine]
    lines_dropped: int
    def __init__(self, output_lines: _Optional[int] = ..., cpu_seconds: _Optional[float] = ..., wall_time: _Optional[float] = ..., restart_count: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[_telemetry_pb2.LogLine, _Mapping]]] = ..., lines_dropped: _Optional[int] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("hello", "step_report", "heartbeat", "event", "finished", "failure", "self_check", "command_ack", "progress")
    HELLO_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    SELF_CHECK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_ACK_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    hello: Hello
    step_report: _telemetry_pb2.StepReport
    heartbeat: _telemetry_pb2.Heartbeat
    event: _telemetry_pb2.Event
    finished: RankFinished
    failure: ExitReport
    self_check: SelfCheckResult
    command_ack: CommandAck
    progress: ProcessProgress
    def __init__(self, hello: _Optional[_Union[Hello, _Mapping]] = ..., step_report: _Optional[_Union[_telemetry_pb2.StepReport, _Mapping]] = ..., heartbeat: _Optional[_Union[_telemetry_pb2.Heartbeat, _Mapping]] = ..., event: _Optional[_Union[_telemetry_pb2.Event, _Mapping]] = ..., finished: _Optional[_Union[RankFinished, _Mapping]] = ..., failure: _Optional[_Union[ExitReport, _Mapping]] = ..., self_check: _Optional[_Union[SelfCheckResult, _Mapping]] = ..., command_ack: _Optional[_Union[CommandAck, _Mapping]] = ..., progress: _Optional[_Union[ProcessProgress, _Mapping]] = ...) -> None: ...

class RankFinished(_message.Message):
    __slots__ = ("steps", "param_digest")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    PARAM_DIGEST_FIELD_NUMBER: _ClassVar[int]
    steps: int
    param_digest: str
    def __init__(self, steps: _Optional[int] = ..., param_digest: _Optional[str] = ...) -> None: ...

class SelfCheckResult(_message.Message):
    __slots__ = ("detail",)
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    detail: _telemetry_pb2.SelfCheckDetail
    def __init__(self, detail: _Optional[_Union[_telemetry_pb2.SelfCheckDetail, _Mapping]] = ...) -> None: ...

class CommandAck(_message.Message):
    __slots__ = ("command_id", "ok", "message")
    COMMAND_ID_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    command_id: str
    ok: bool
    message: str
    def __init__(self, command_id: _Optional[str] = ..., ok: _Optional[bool] = ..., message: _Optional[str] = ...) -> None: ...

class Command(_message.Message):
    __slots__ = ("id", "kind", "step")
    ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    id: str
    kind: CommandKind
    step: int
    def __init__(self, id: _Optional[str] = ..., kind: _Optional[_Union[CommandKind, str]] = ..., step: _Optional[int] = ...) -> None: ...

class Ack(_message.Message):
    __slots__ = ("node", "agent_version")
    NODE_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    node: str
    agent_version: str
    def __init__(self, node: _Optional[str] = ..., agent_version: _Optional[str] = ...) -> None: ...

class AttachResponse(_message.Message):
    __slots__ = ("ack", "command")
    ACK_FIELD_NUMBER: _ClassVar[int]
    COMMAND_FIELD_NUMBER: _ClassVar[int]
    ack: Ack
    command: Command
    def __init__(self, ack: _Optional[_Union[Ack, _Mapping]] = ..., command: _Optional[_Union[Command, _Mapping]] = ...) -> None: ...
