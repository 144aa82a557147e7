from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RankState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANK_STATE_UNSPECIFIED: _ClassVar[RankState]
    RANK_STATE_STARTING: _ClassVar[RankState]
    RANK_STATE_RUNNING: _ClassVar[RankState]
    RANK_STATE_EXITED: _ClassVar[RankState]
    RANK_STATE_FAILED: _ClassVar[RankState]
    RANK_STATE_HUNG: _ClassVar[RankState]
RANK_STATE_UNSPECIFIED: RankState
RANK_STATE_STARTING: RankState
RANK_STATE_RUNNING: RankState
RANK_STATE_EXITED: RankState
RANK_STATE_FAILED: RankState
RANK_STATE_HUNG: RankState

class CollectiveTiming(_message.Message):
    __slots__ = ("name", "bucket_index", "bytes", "start_offset_seconds", "duration_seconds", "blocked_seconds")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BUCKET_INDEX_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    START_OFFSET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DURATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BLOCKED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    bucket_index: int
    bytes: int
    start_offset_seconds: float
    duration_seconds: float
    blocked_seconds: float
    def __init__(self, name: _Optional[str] = ..., bucket_index: _Optional[int] = ..., bytes: _Optional[int] = ..., start_offset_seconds: _Optional[float] = ..., duration_seconds: _Optional[float] = ..., blocked_seconds: _Optional[float] = ...) -> None: ...

class StepReport(_message.Message):
    __slots__ = ("node", "rank", "local_rank", "world_size", "step", "loss", "lr", "grad_norm", "tokens", "step_seconds", "data_wait_seconds", "forward_seconds", "backward_seconds", "comm_wait_seconds", "optimizer_seconds", "other_seconds", "tokens_per_second", "mfu", "model_flops", "collectives", "gc_pause_seconds", "wall_time", "restart_count", "collectives_issued", "val_loss", "cpu_seconds", "device_compute_seconds")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STEP_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DATA_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FORWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    COMM_WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    OTHER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    MFU_FIELD_NUMBER: _ClassVar[int]
    MODEL_FLOPS_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_FIELD_NUMBER: _ClassVar[int]
    GC_PAUSE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_ISSUED_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    node: str
    rank: int
    local_rank: int
    world_size: int
    step: int
    loss: float
    lr: float
    grad_norm: float
    tokens: int
    step_seconds: float
    data_wait_seconds: float
    forward_seconds: float
    backward_seconds: float
    comm_wait_seconds: float
    optimizer_seconds: float
    other_seconds: float
    tokens_per_second: float
    mfu: float
    model_flops: float
    collectives: _containers.RepeatedCompositeFieldContainer[CollectiveTiming]
    gc_pause_seconds: float
    wall_time: float
    restart_count: int
    collectives_issued: int
    val_loss: float
    cpu_seconds: float
    device_compute_seconds: float
    def __init__(self, node: _Optional[str] = ..., rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., lr: _Optional[float] = ..., grad_norm: _Optional[float] = ..., tokens: _Optional[int] = ..., step_seconds: _Optional[float] = ..., data_wait_seconds: _Optional[float] = ..., forward_seconds: _Optional[float] = ..., backward_seconds: _Optional[float] = ..., comm_wait_seconds: _Optional[float] = ..., optimizer_seconds: _Optional[float] = ..., other_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., mfu: _Optional[float] = ..., model_flops: _Optional[float] = ..., collectives: _Optional[_Iterable[_Union[CollectiveTiming, _Mapping]]] = ..., gc_pause_seconds: _Optional[float] = ..., wall_time: _Optional[float] = ..., restart_count: _Optional[int] = ..., collectives_issued: _Optional[int] = ..., val_loss: _Optional[float] = ..., cpu_seconds: _Optional[float] = ..., device_compute_seconds: _Optional[float] = ...) -> None: ...

class HostSample(_message.Message):
    __slots__ = ("node", "wall_time", "cpu_percent", "cpu_percents", "memory_used_bytes", "memory_total_bytes", "disk_read_bytes_per_second", "disk_write_bytes_per_second", "net_recv_bytes_per_second", "net_sent_bytes_per_second", "load_average_1m")
    NODE_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENT_FIELD_NUMBER: _ClassVar[int]
    CPU_PERCENTS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITE_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NET_RECV_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    NET_SENT_BYTES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    LOAD_AVERAGE_1M_FIELD_NUMBER: _ClassVar[int]
    node: str
    wall_time: float
    cpu_percent: float
    cpu_percents: _containers.RepeatedScalarFieldContainer[float]
    memory_used_bytes: int
    memory_total_bytes: int
    disk_read_bytes_per_second: float
    disk_write_bytes_per_second: float
    net_recv_bytes_per_second: float
    net_sent_bytes_per_second: float
    load_average_1m: float
    def __init__(self, node: _Optional[str] = ..., wall_time: _Optional[float] = ..., cpu_percent: _Optional[float] = ..., cpu_percents: _Optional[_Iterable[float]] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., disk_read_bytes_per_second: _Optional[float] = ..., disk_write_bytes_per_second: _Optional[float] = ..., net_recv_bytes_per_second: _Optional[float] = ..., net_sent_bytes_per_second: _Optional[float] = ..., load_average_1m: _Optional[float] = ...) -> None: ...

class GpuSample(_message.Message):
    __slots__ = ("node", "wall_time", "index", "name", "uuid", "utilization_percent", "memory_used_bytes", "memory_total_bytes", "temperature_celsius", "power_watts", "power_limit_watts", "sm_clock_mhz", "mem_clock_mhz", "ecc_errors_corrected", "ecc_errors_uncorrected", "xid_errors", "throttle_reasons")
    NODE_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PERCENT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_CELSIUS_FIELD_NUMBER: _ClassVar[int]
    POWER_WATTS_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_WATTS_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MEM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    ECC_ERRORS_CORRECTED_FIELD_NUMBER: _ClassVar[int]
    ECC_ERRORS_UNCORRECTED_FIELD_NUMBER: _ClassVar[int]
    XID_ERRORS_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_REASONS_FIELD_NUMBER: _ClassVar[int]
    node: str
    wall_time: float
    index: int
    name: str
    uuid: str
    utilization_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    temperature_celsius: float
    power_watts: float
    power_limit_watts: float
    sm_clock_mhz: int
    mem_clock_mhz: int
    ecc_errors_corrected: int
    ecc_errors_uncorrected: int
    xid_errors: _containers.RepeatedScalarFieldContainer[int]
    throttle_reasons: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node: _Optional[str] = ..., wall_time: _Optional[float] = ..., index: _Optional[int] = ..., name: _Optional[str] = ..., uuid: _Optional[str] = ..., utilization_percent: _Optional[float] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., temperature_celsius: _Optional[float] = ..., power_watts: _Optional[float] = ..., power_limit_watts: _Optional[float] = ..., sm_clock_mhz: _Optional[int] = ..., mem_clock_mhz: _Optional[int] = ..., ecc_errors_corrected: _Optional[int] = ..., ecc_errors_uncorrected: _Optional[int] = ..., xid_errors: _Optional[_Iterable[int]] = ..., throttle_reasons: _Optional[_Iterable[str]] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("wall_time", "node", "kind", "severity", "rank", "step", "text", "attributes")
    class Severity(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SEVERITY_UNSPECIFIED: _ClassVar[Event.Severity]
        SEVERITY_INFO: _ClassVar[Event.Severity]
        SEVERITY_WARNING: _ClassVar[Event.Severity]
        SEVERITY_ERROR: _ClassVar[Event.Severity]
        SEVERITY_CRITICAL: _ClassVar[Event.Severity]
    SEVERITY_UNSPECIFIED: Event.Severity
    SEVERITY_INFO: Event.Severity
    SEVERITY_WARNING: Event.Severity
    SEVERITY_ERROR: Event.Severity
    SEVERITY_CRITICAL: Event.Severity
    class AttributesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ATTRIBUTES_FIELD_NUMBER: _ClassVar[int]
    wall_time: float
    node: str
    kind: str
    severity: Event.Severity
    rank: int
    step: int
    text: str
    attributes: _containers.ScalarMap[str, str]
    def __init__(self, wall_time: _Optional[float] = ..., node: _Optional[str] = ..., kind: _Optional[str] = ..., severity: _Optional[_Union[Event.Severity, str]] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., text: _Optional[str] = ..., attributes: _Optional[_Mapping[str, str]] = ...) -> None: ...

class Heartbeat(_message.Message):
    __slots__ = ("node", "rank", "wall_time", "step", "pid", "completed_step", "collectives_issued")
    NODE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_STEP_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_ISSUED_FIELD_NUMBER: _ClassVar[int]
    node: str
    rank: int
    wall_time: float
    step: int
    pid: int
    completed_step: int
    collectives_issued: int
    def __init__(self, node: _Optional[str] = ..., rank: _Optional[int] = ..., wall_time: _Optional[float] = ..., step: _Optional[int] = ..., pid: _Optional[int] = ..., completed_step: _Optional[int] = ..., collectives_issued: _Optional[int] = ...) -> None: ...

class NodeInfo(_message.Message):
    __slots__ = ("node", "hostname", "agent_address", "pid", "ranks", "world_size", "gpu_available", "gpu_status", "start_wall_time", "agent_version", "total_steps", "run_id")
    NODE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    AGENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    GPU_AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    GPU_STATUS_FIELD_NUMBER: _ClassVar[int]
    START_WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    node: str
    hostname: str
    agent_address: str
    pid: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    world_size: int
    gpu_available: bool
    gpu_status: str
    start_wall_time: float
    agent_version: str
    total_steps: int
    run_id: str
    def __init__(self, node: _Optional[str] = ..., hostname: _Optional[str] = ..., agent_address: _Optional[str] = ..., pid: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ..., world_size: _Optional[int] = ..., gpu_available: _Optional[bool] = ..., gpu_status: _Optional[str] = ..., start_wall_time: _Optional[float] = ..., agent_version: _Optional[str] = ..., total_steps: _Optional[int] = ..., run_id: _Optional[str] = ...) -> None: ...

class RankStatus(_message.Message):
    __slots__ = ("rank", "pid", "state", "last_step", "last_heartbeat_wall_time", "collectives_issued", "restart_count", "exit_reason")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_ISSUED_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    rank: int
    pid: int
    state: RankState
    last_step: int
    last_heartbeat_wall_time: float
    collectives_issued: int
    restart_count: int
    exit_reason: str
    def __init__(self, rank: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[_Union[RankState, str]] = ..., last_step: _Optional[int] = ..., last_heartbeat_wall_time: _Optional[float] = ..., collectives_issued: _Optional[int] = ..., restart_count: _Optional[int] = ..., exit_reason: _Optional[str] = ...) -> None: ...

class Telemetry(_message.Message):
    __slots__ = ("step_reports", "host_samples", "gpu_samples", "events", "backfill", "node_info", "rank_statuses")
    STEP_REPORTS_FIELD_NUMBER: _ClassVar[int]
    HOST_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    GPU_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    BACKFILL_FIELD_NUMBER: _ClassVar[int]
    NODE_INFO_FIELD_NUMBER: _ClassVar[int]
    RANK_STATUSES_FIELD_NUMBER: _ClassVar[int]
    step_reports: _containers.RepeatedCompositeFieldContainer[StepReport]
    host_samples: _containers.RepeatedCompositeFieldContainer[HostSample]
    gpu_samples: _containers.RepeatedCompositeFieldContainer[GpuSample]
    events: _containers.RepeatedCompositeFieldContainer[Event]
    backfill: bool
    node_info: NodeInfo
    rank_statuses: _containers.RepeatedCompositeFieldContainer[RankStatus]
    def __init__(self, step_reports: _Optional[_Iterable[_Union[StepReport, _Mapping]]] = ..., host_samples: _Optional[_Iterable[_Union[HostSample, _Mapping]]] = ..., gpu_samples: _Optional[_Iterable[_Union[GpuSample, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[Event, _Mapping]]] = ..., backfill: _Optional[bool] = ..., node_info: _Optional[_Union[NodeInfo, _Mapping]] = ..., rank_statuses: _Optional[_Iterable[_Union[RankStatus, _Mapping]]] = ...) -> None: ...
