from megascope.protos.megascope.v1 import telemetry_pb2 as _telemetry_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("node_info", "step_reports", "host_sample", "gpu_samples", "events", "rank_statuses")
    NODE_INFO_FIELD_NUMBER: _ClassVar[int]
    STEP_REPORTS_FIELD_NUMBER: _ClassVar[int]
    HOST_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    GPU_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    RANK_STATUSES_FIELD_NUMBER: _ClassVar[int]
    node_info: _telemetry_pb2.NodeInfo
    step_reports: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.StepReport]
    host_sample: _telemetry_pb2.HostSample
    gpu_samples: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.GpuSample]
    events: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.Event]
    rank_statuses: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.RankStatus]
    def __init__(self, node_info: _Optional[_Union[_telemetry_pb2.NodeInfo, _Mapping]] = ..., step_reports: _Optional[_Iterable[_Union[_telemetry_pb2.StepReport, _Mapping]]] = ..., host_sample: _Optional[_Union[_telemetry_pb2.HostSample, _Mapping]] = ..., gpu_samples: _Optional[_Iterable[_Union[_telemetry_pb2.GpuSample, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[_telemetry_pb2.Event, _Mapping]]] = ..., rank_statuses: _Optional[_Iterable[_Union[_telemetry_pb2.RankStatus, _Mapping]]] = ...) -> None: ...

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
    __slots__ = ("events",)
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    events: _containers.RepeatedCompositeFieldContainer[_telemetry_pb2.Event]
    def __init__(self, events: _Optional[_Iterable[_Union[_telemetry_pb2.Event, _Mapping]]] = ...) -> None: ...

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
