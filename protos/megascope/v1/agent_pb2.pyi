from megascope.protos.megascope.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class MergeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_STATE_UNSPECIFIED: _ClassVar[MergeState]
    MERGE_STATE_RUNNING: _ClassVar[MergeState]
    MERGE_STATE_DONE: _ClassVar[MergeState]
    MERGE_STATE_FAILED: _ClassVar[MergeState]
    MERGE_STATE_CANCELLED: _ClassVar[MergeState]
MERGE_STATE_UNSPECIFIED: MergeState
MERGE_STATE_RUNNING: MergeState
MERGE_STATE_DONE: MergeState
MERGE_STATE_FAILED: MergeState
MERGE_STATE_CANCELLED: MergeState

class WatchRequest(_message.Message):
    __slots__ = ("backfill_seconds",)
    BACKFILL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    backfill_seconds: float
    def __init__(self, backfill_seconds: _Optional[float] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("telemetry",)
    TELEMETRY_FIELD_NUMBER: _ClassVar[int]
    telemetry: _telemetry_pb2.Telemetry
    def __init__(self, telemetry: _Optional[_Union[_telemetry_pb2.Telemetry, _Mapping]] = ...) -> None: ...

class GetSnapshotRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetSnapshotResponse(_message.Message):
    __slots__ = ("node_info", "step_reports", "host_sample", "gpu_samples", "events", "rank_statuses", "events_left_out")
    NODE_INFO_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORTS_FIELD_NUMBER: _ClassVar[int]
    HOST_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    GPU_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    RANK_STATUSES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    node_info: _telemetry_pb2.NodeInfo
    step_reports: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.StepReport]
    host_sample: _telemetry_pb2.HostSample
    gpu_samples: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.GpuSample]
    events: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.Event]
    rank_statuses: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.RankStatus]
    events_left_out: int
    def __init__(self, node_info: _Optional[_Union[_telemetry_pb2.NodeInfo, _Mapping]] = ..., step_reports: _Optional[_Iterable[_Union[_telemetry_pb2.StepReport, _Mapping]]] = ..., host_sample: _Optional[_Union[_telemetry_pb2.HostSample, _Mapping]] = ..., gpu_samples: _Optional[_Iterable[_Union[_telemetry_pb2.GpuSample, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[_telemetry_pb2.Event, _Mapping]]] = ..., rank_statuses: _Optional[_Iterable[_Union[_telemetry_pb2.RankStatus, _Mapping]]] = ..., events_left_out: _Optional[int] = ...) -> None: ...

class GetEventsRequest(_message.Message):
    __slots__ = ("since_wall_time", "limit", "kinds")
    SINCE_WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    KINDS_FIELD_NUMBER: _ClassVar[int]
    since_wall_time: float
    limit: int
    kinds: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, since_wall_time: _Optional[float] = ..., limit: _Optional[int] = ..., kinds: _Optional[_Iterable[str]] = ...) -> None: ...

class GetEventsResponse(_message.Message):
    __slots__ = ("events", "events_left_out")
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.Event]
    events_left_out: int
    def __init__(self, events: _Optional[_Iterable[_Union[_telemetry_pb2.Event, _Mapping]]] = ..., events_left_out: _Optional[int] = ...) -> None: ...

class SaveCheckpointRequest(_message.Message):
    __slots__ = ("step",)
    STEP_FIELD_NUMBER: _ClassVar[int]
    step: int
    def __init__(self, step: _Optional[int] = ...) -> None: ...

class SaveCheckpointResponse(_message.Message):
    __slots__ = ("step", "ranks")
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    step: int
    ranks: int
    def __init__(self, step: _Optional[int] = ..., ranks: _Optional[int] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointInfo(_message.Message):
    __slots__ = ("step", "path", "wall_time", "size_bytes", "world_size", "val_loss", "merged")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    step: int
    path: str
    wall_time: float
    size_bytes: int
    world_size: int
    val_loss: float
    merged: bool
    def __init__(self, step: _Optional[int] = ..., path: _Optional[str] = ..., wall_time: _Optional[float] = ..., size_bytes: _Optional[int] = ..., world_size: _Optional[int] = ..., val_loss: _Optional[float] = ..., merged: _Optional[bool] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("directory", "checkpoints", "merged")
    DIRECTORY_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    directory: str
    checkpoints: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    merged: _containers.RepeatedCompositeFieldContainer[CheckpointInfo]
    def __init__(self, directory: _Optional[str] = ..., checkpoints: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ..., merged: _Optional[_Iterable[_Union[CheckpointInfo, _Mapping]]] = ...) -> None: ...

class StartMergeRequest(_message.Message):
    __slots__ = ("method", "alpha", "weights", "steps", "last", "every", "eval")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    EVERY_FIELD_NUMBER: _ClassVar[int]
    EVAL_FIELD_NUMBER: _ClassVar[int]
    method: str
    alpha: float
    weights: _containers.RepeatedScalarFieldContainer[float]
    steps: _containers.RepeatedScalarFieldContainer[int]
    last: int
    every: int
    eval: bool
    def __init__(self, method: _Optional[str] = ..., alpha: _Optional[float] = ..., weights: _Optional[_Iterable[float]] = ..., steps: _Optional[_Iterable[int]] = ..., last: _Optional[int] = ..., every: _Optional[int] = ..., eval: _Optional[bool] = ...) -> None: ...

class MergeProgress(_message.Message):
    __slots__ = ("state", "tensors_done", "tensors_total", "bytes_done", "bytes_total", "message", "out", "steps", "method", "val_loss", "input_val_losses")
    class InputValLossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    STATE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_DONE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    BYTES_DONE_FIELD_NUMBER: _ClassVar[int]
    BYTES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    INPUT_VAL_LOSSES_FIELD_NUMBER: _ClassVar[int]
    state: MergeState
    tensors_done: int
    tensors_total: int
    bytes_done: int
    bytes_total: int
    message: str
    out: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    method: str
    val_loss: float
    input_val_losses: _containers.ScalarMap[int, float]
    def __init__(self, state: _Optional[_Union[MergeState, str]] = ..., tensors_done: _Optional[int] = ..., tensors_total: _Optional[int] = ..., bytes_done: _Optional[int] = ..., bytes_total: _Optional[int] = ..., message: _Optional[str] = ..., out: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., method: _Optional[str] = ..., val_loss: _Optional[float] = ..., input_val_losses: _Optional[_Mapping[int, float]] = ...) -> None: ...

class StartMergeResponse(_message.Message):
    __slots__ = ("progress",)
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    progress: MergeProgress
    def __init__(self, progress: _Optional[_Union[MergeProgress, _Mapping]] = ...) -> None: ...

class GetMergeStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMergeStatusResponse(_message.Message):
    __slots__ = ("progress",)
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    progress: MergeProgress
    def __init__(self, progress: _Optional[_Union[MergeProgress, _Mapping]] = ...) -> None: ...

class CancelMergeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CancelMergeResponse(_message.Message):
    __slots__ = ("cancelled",)
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    def __init__(self, cancelled: _Optional[bool] = ...) -> None: ...

class RestartRequest(_message.Message):
    __slots__ = ("step", "reason")
    STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    step: int
    reason: str
    def __init__(self, step: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class RestartResponse(_message.Message):
    __slots__ = ("ranks_stopped", "step")
    RANKS_STOPPED_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ranks_stopped: int
    step: int
    def __init__(self, ranks_stopped: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class DumpStacksRequest(_message.Message):
    __slots__ = ("timeout_seconds",)
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    timeout_seconds: float
    def __init__(self, timeout_seconds: _Optional[float] = ...) -> None: ...

class RankStacks(_message.Message):
    __slots__ = ("rank", "pid", "answered", "method", "text", "last_step", "collectives_issued", "signature")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_ISSUED_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    rank: int
    pid: int
    answered: bool
    method: str
    text: str
    last_step: int
    collectives_issued: int
    signature: str
    def __init__(self, rank: _Optional[int] = ..., pid: _Optional[int] = ..., answered: _Optional[bool] = ..., method: _Optional[str] = ..., text: _Optional[str] = ..., last_step: _Optional[int] = ..., collectives_issued: _Optional[int] = ..., signature: _Optional[str] = ...) -> None: ...

class DumpStacksResponse(_message.Message):
    __slots__ = ("ranks", "culprit", "reason")
    RANKS_FIELD_NUMBER: _ClassVar[int]
    CULPRIT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedCompositeFieldContainer[RankStacks]
    culprit: int
    reason: str
    def __init__(self, ranks: _Optional[_Iterable[_Union[RankStacks, _Mapping]]] = ..., culprit: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class GetRankLogRequest(_message.Message):
    __slots__ = ("rank", "max_lines")
    RANK_FIELD_NUMBER: _ClassVar[int]
    MAX_LINES_FIELD_NUMBER: _ClassVar[int]
    rank: int
    max_lines: int
    def __init__(self, rank: _Optional[int] = ..., max_lines: _Optional[int] = ...) -> None: ...

class GetRankLogResponse(_message.Message):
    __slots__ = ("rank", "lines", "lines_left_out", "lines_dropped", "pid", "restart_count")
    RANK_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    LINES_LEFT_OUT_FIELD_NUMBER: _ClassVar[int]
    LINES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    rank: int
    lines: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.LogLine]
    lines_left_out: int
    lines_dropped: int
    pid: int
    restart_count: int
    def __init__(self, rank: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[_telemetry_pb2.LogLine, _Mapping]]] = ..., lines_left_out: _Optional[int] = ..., lines_dropped: _Optional[int] = ..., pid: _Optional[int] = ..., restart_count: _Optional[int] = ...) -> None: ...
