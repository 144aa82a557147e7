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

class RankSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RANK_SOURCE_UNSPECIFIED: _ClassVar[RankSource]
    RANK_SOURCE_PROCESS: _ClassVar[RankSource]
    RANK_SOURCE_STEPS: _ClassVar[RankSource]

class LogStream(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LOG_STREAM_UNSPECIFIED: _ClassVar[LogStream]
    LOG_STREAM_STDOUT: _ClassVar[LogStream]
    LOG_STREAM_STDERR: _ClassVar[LogStream]
    LOG_STREAM_AGENT: _ClassVar[LogStream]
RANK_STATE_UNSPECIFIED: RankState
RANK_STATE_STARTING: RankState
RANK_STATE_RUNNING: RankState
RANK_STATE_EXITED: RankState
RANK_STATE_FAILED: RankState
RANK_STATE_HUNG: RankState
RANK_SOURCE_UNSPECIFIED: RankSource
RANK_SOURCE_PROCESS: RankSource
RANK_SOURCE_STEPS: RankSource
LOG_STREAM_UNSPECIFIED: LogStream
LOG_STREAM_STDOUT: LogStream
LOG_STREAM_STDERR: LogStream
LOG_STREAM_AGENT: LogStream

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
    __slots__ = ("node", "rank", "local_rank", "world_size", "step", "loss", "lr", "grad_norm", "tokens", "step_seconds", "data_wait_seconds", "forward_seconds", "backward_seconds", "comm_wait_seconds", "optimizer_seconds", "other_seconds", "tokens_per_second", "mfu", "model_flops", "collectives", "gc_pause_seconds", "wall_time", "restart_count", "collectives_issued", "val_loss", "cpu_seconds", "device_compute_seconds", "scalars")
    class ScalarsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
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
    SCALARS_FIELD_NUMBER: _ClassVar[int]
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
    scalars: _containers.ScalarMap[str, float]
    def __init__(self, node: _Optional[str] = ..., rank: _Optional[int] = ..., local_rank: _Optional[int] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ..., loss: _Optional[float] = ..., lr: _Optional[float] = ..., grad_norm: _Optional[float] = ..., tokens: _Optional[int] = ..., step_seconds: _Optional[float] = ..., data_wait_seconds: _Optional[float] = ..., forward_seconds: _Optional[float] = ..., backward_seconds: _Optional[float] = ..., comm_wait_seconds: _Optional[float] = ..., optimizer_seconds: _Optional[float] = ..., other_seconds: _Optional[float] = ..., tokens_per_second: _Optional[float] = ..., mfu: _Optional[float] = ..., model_flops: _Optional[float] = ..., collectives: _Optional[_Iterable[_Union[CollectiveTiming, _Mapping]]] = ..., gc_pause_seconds: _Optional[float] = ..., wall_time: _Optional[float] = ..., restart_count: _Optional[int] = ..., collectives_issued: _Optional[int] = ..., val_loss: _Optional[float] = ..., cpu_seconds: _Optional[float] = ..., device_compute_seconds: _Optional[float] = ..., scalars: _Optional[_Mapping[str, float]] = ...) -> None: ...

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
    __slots__ = ("wall_time", "node", "kind", "severity", "rank", "step", "text", "crash", "hang", "restart", "checkpoint", "resume", "straggler", "self_check", "merge", "run", "job", "fault_injected", "agent_link", "recovery")
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
    WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEVERITY_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    CRASH_FIELD_NUMBER: _ClassVar[int]
    HANG_FIELD_NUMBER: _ClassVar[int]
    RESTART_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    STRAGGLER_FIELD_NUMBER: _ClassVar[int]
    SELF_CHECK_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    FAULT_INJECTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_LINK_FIELD_NUMBER: _ClassVar[int]
    RECOVERY_FIELD_NUMBER: _ClassVar[int]
    wall_time: float
    node: str
    kind: str
    severity: Event.Severity
    rank: int
    step: int
    text: str
    crash: CrashDetail
    hang: HangDetail
    restart: RestartDetail
    checkpoint: CheckpointDetail
    resume: ResumeDetail
    straggler: StragglerDetail
    self_check: SelfCheckDetail
    merge: MergeDetail
    run: RunDetail
    job: JobDetail
    fault_injected: FaultInjectedDetail
    agent_link: AgentLinkDetail
    recovery: RecoveryDetail
    def __init__(self, wall_time: _Optional[float] = ..., node: _Optional[str] = ..., kind: _Optional[str] = ..., severity: _Optional[_Union[Event.Severity, str]] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ..., text: _Optional[str] = ..., crash: _Optional[_Union[CrashDetail, _Mapping]] = ..., hang: _Optional[_Union[HangDetail, _Mapping]] = ..., restart: _Optional[_Union[RestartDetail, _Mapping]] = ..., checkpoint: _Optional[_Union[CheckpointDetail, _Mapping]] = ..., resume: _Optional[_Union[ResumeDetail, _Mapping]] = ..., straggler: _Optional[_Union[StragglerDetail, _Mapping]] = ..., self_check: _Optional[_Union[SelfCheckDetail, _Mapping]] = ..., merge: _Optional[_Union[MergeDetail, _Mapping]] = ..., run: _Optional[_Union[RunDetail, _Mapping]] = ..., job: _Optional[_Union[JobDetail, _Mapping]] = ..., fault_injected: _Optional[_Union[FaultInjectedDetail, _Mapping]] = ..., agent_link: _Optional[_Union[AgentLinkDetail, _Mapping]] = ..., recovery: _Optional[_Union[RecoveryDetail, _Mapping]] = ...) -> None: ...

class CrashDetail(_message.Message):
    __slots__ = ("exit_code", "signal", "pid", "detect_seconds", "last_step", "log_tail", "restart_count", "cause")
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    SIGNAL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    DETECT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    LOG_TAIL_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    exit_code: int
    signal: str
    pid: int
    detect_seconds: float
    last_step: int
    log_tail: _containers.RepeatedScalarFieldContainer[str]
    restart_count: int
    cause: str
    def __init__(self, exit_code: _Optional[int] = ..., signal: _Optional[str] = ..., pid: _Optional[int] = ..., detect_seconds: _Optional[float] = ..., last_step: _Optional[int] = ..., log_tail: _Optional[_Iterable[str]] = ..., restart_count: _Optional[int] = ..., cause: _Optional[str] = ...) -> None: ...

class HangDetail(_message.Message):
    __slots__ = ("verdict", "culprit_rank", "reason", "how", "detect_seconds", "last_step", "ranks_answered", "ranks_total")
    class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VERDICT_UNSPECIFIED: _ClassVar[HangDetail.Verdict]
        VERDICT_CULPRIT: _ClassVar[HangDetail.Verdict]
        VERDICT_NO_CULPRIT: _ClassVar[HangDetail.Verdict]
        VERDICT_ELSEWHERE: _ClassVar[HangDetail.Verdict]
    VERDICT_UNSPECIFIED: HangDetail.Verdict
    VERDICT_CULPRIT: HangDetail.Verdict
    VERDICT_NO_CULPRIT: HangDetail.Verdict
    VERDICT_ELSEWHERE: HangDetail.Verdict
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    CULPRIT_RANK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    HOW_FIELD_NUMBER: _ClassVar[int]
    DETECT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    RANKS_ANSWERED_FIELD_NUMBER: _ClassVar[int]
    RANKS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    verdict: HangDetail.Verdict
    culprit_rank: int
    reason: str
    how: str
    detect_seconds: float
    last_step: int
    ranks_answered: int
    ranks_total: int
    def __init__(self, verdict: _Optional[_Union[HangDetail.Verdict, str]] = ..., culprit_rank: _Optional[int] = ..., reason: _Optional[str] = ..., how: _Optional[str] = ..., detect_seconds: _Optional[float] = ..., last_step: _Optional[int] = ..., ranks_answered: _Optional[int] = ..., ranks_total: _Optional[int] = ...) -> None: ...

class RestartDetail(_message.Message):
    __slots__ = ("cause", "phase", "mttr_seconds", "steps_lost", "resumed_step", "from_step", "reason", "in_place")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[RestartDetail.Phase]
        PHASE_REQUESTED: _ClassVar[RestartDetail.Phase]
        PHASE_DONE: _ClassVar[RestartDetail.Phase]
    PHASE_UNSPECIFIED: RestartDetail.Phase
    PHASE_REQUESTED: RestartDetail.Phase
    PHASE_DONE: RestartDetail.Phase
    class Cause(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CAUSE_UNSPECIFIED: _ClassVar[RestartDetail.Cause]
        CAUSE_CRASH: _ClassVar[RestartDetail.Cause]
        CAUSE_HANG: _ClassVar[RestartDetail.Cause]
        CAUSE_REQUESTED: _ClassVar[RestartDetail.Cause]
        CAUSE_NODE_LEFT: _ClassVar[RestartDetail.Cause]
    CAUSE_UNSPECIFIED: RestartDetail.Cause
    CAUSE_CRASH: RestartDetail.Cause
    CAUSE_HANG: RestartDetail.Cause
    CAUSE_REQUESTED: RestartDetail.Cause
    CAUSE_NODE_LEFT: RestartDetail.Cause
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MTTR_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STEPS_LOST_FIELD_NUMBER: _ClassVar[int]
    RESUMED_STEP_FIELD_NUMBER: _ClassVar[int]
    FROM_STEP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    IN_PLACE_FIELD_NUMBER: _ClassVar[int]
    cause: RestartDetail.Cause
    phase: RestartDetail.Phase
    mttr_seconds: float
    steps_lost: int
    resumed_step: int
    from_step: int
    reason: str
    in_place: bool
    def __init__(self, cause: _Optional[_Union[RestartDetail.Cause, str]] = ..., phase: _Optional[_Union[RestartDetail.Phase, str]] = ..., mttr_seconds: _Optional[float] = ..., steps_lost: _Optional[int] = ..., resumed_step: _Optional[int] = ..., from_step: _Optional[int] = ..., reason: _Optional[str] = ..., in_place: _Optional[bool] = ...) -> None: ...

class RecoveryDetail(_message.Message):
    __slots__ = ("replaced_ranks", "generation", "step", "donor_rank", "steps_redone", "failed_wall_time", "reform_seconds", "transfer_seconds", "state_bytes", "replacement_ready_seconds", "total_seconds")
    REPLACED_RANKS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    DONOR_RANK_FIELD_NUMBER: _ClassVar[int]
    STEPS_REDONE_FIELD_NUMBER: _ClassVar[int]
    FAILED_WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    REFORM_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    REPLACEMENT_READY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    replaced_ranks: _containers.RepeatedScalarFieldContainer[int]
    generation: int
    step: int
    donor_rank: int
    steps_redone: int
    failed_wall_time: float
    reform_seconds: float
    transfer_seconds: float
    state_bytes: int
    replacement_ready_seconds: float
    total_seconds: float
    def __init__(self, replaced_ranks: _Optional[_Iterable[int]] = ..., generation: _Optional[int] = ..., step: _Optional[int] = ..., donor_rank: _Optional[int] = ..., steps_redone: _Optional[int] = ..., failed_wall_time: _Optional[float] = ..., reform_seconds: _Optional[float] = ..., transfer_seconds: _Optional[float] = ..., state_bytes: _Optional[int] = ..., replacement_ready_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class CheckpointDetail(_message.Message):
    __slots__ = ("phase", "step", "path", "bytes", "block_seconds", "stage_seconds", "write_seconds", "total_seconds", "error", "removed", "free_bytes")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[CheckpointDetail.Phase]
        PHASE_REQUESTED: _ClassVar[CheckpointDetail.Phase]
        PHASE_STARTED: _ClassVar[CheckpointDetail.Phase]
        PHASE_SAVED: _ClassVar[CheckpointDetail.Phase]
        PHASE_FAILED: _ClassVar[CheckpointDetail.Phase]
        PHASE_REFUSED: _ClassVar[CheckpointDetail.Phase]
        PHASE_CLEANUP: _ClassVar[CheckpointDetail.Phase]
        PHASE_MADE_ROOM: _ClassVar[CheckpointDetail.Phase]
    PHASE_UNSPECIFIED: CheckpointDetail.Phase
    PHASE_REQUESTED: CheckpointDetail.Phase
    PHASE_STARTED: CheckpointDetail.Phase
    PHASE_SAVED: CheckpointDetail.Phase
    PHASE_FAILED: CheckpointDetail.Phase
    PHASE_REFUSED: CheckpointDetail.Phase
    PHASE_CLEANUP: CheckpointDetail.Phase
    PHASE_MADE_ROOM: CheckpointDetail.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STAGE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WRITE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    phase: CheckpointDetail.Phase
    step: int
    path: str
    bytes: int
    block_seconds: float
    stage_seconds: float
    write_seconds: float
    total_seconds: float
    error: str
    removed: _containers.RepeatedScalarFieldContainer[int]
    free_bytes: int
    def __init__(self, phase: _Optional[_Union[CheckpointDetail.Phase, str]] = ..., step: _Optional[int] = ..., path: _Optional[str] = ..., bytes: _Optional[int] = ..., block_seconds: _Optional[float] = ..., stage_seconds: _Optional[float] = ..., write_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ..., error: _Optional[str] = ..., removed: _Optional[_Iterable[int]] = ..., free_bytes: _Optional[int] = ...) -> None: ...

class ResumeDetail(_message.Message):
    __slots__ = ("source", "path", "step", "load_seconds", "bytes_read", "optimizer", "error", "set_aside")
    class Source(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        SOURCE_UNSPECIFIED: _ClassVar[ResumeDetail.Source]
        SOURCE_RESUME: _ClassVar[ResumeDetail.Source]
        SOURCE_INIT_FROM: _ClassVar[ResumeDetail.Source]
        SOURCE_MISSING_STEP: _ClassVar[ResumeDetail.Source]
        SOURCE_SKIPPED: _ClassVar[ResumeDetail.Source]
    SOURCE_UNSPECIFIED: ResumeDetail.Source
    SOURCE_RESUME: ResumeDetail.Source
    SOURCE_INIT_FROM: ResumeDetail.Source
    SOURCE_MISSING_STEP: ResumeDetail.Source
    SOURCE_SKIPPED: ResumeDetail.Source
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LOAD_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BYTES_READ_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SET_ASIDE_FIELD_NUMBER: _ClassVar[int]
    source: ResumeDetail.Source
    path: str
    step: int
    load_seconds: float
    bytes_read: int
    optimizer: str
    error: str
    set_aside: str
    def __init__(self, source: _Optional[_Union[ResumeDetail.Source, str]] = ..., path: _Optional[str] = ..., step: _Optional[int] = ..., load_seconds: _Optional[float] = ..., bytes_read: _Optional[int] = ..., optimizer: _Optional[str] = ..., error: _Optional[str] = ..., set_aside: _Optional[str] = ...) -> None: ...

class StragglerDetail(_message.Message):
    __slots__ = ("cause", "ratio", "cost_seconds", "since_step", "flagged_step", "cleared_step", "cleared_reason", "threshold", "node_wide")
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    RATIO_FIELD_NUMBER: _ClassVar[int]
    COST_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SINCE_STEP_FIELD_NUMBER: _ClassVar[int]
    FLAGGED_STEP_FIELD_NUMBER: _ClassVar[int]
    CLEARED_STEP_FIELD_NUMBER: _ClassVar[int]
    CLEARED_REASON_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    NODE_WIDE_FIELD_NUMBER: _ClassVar[int]
    cause: str
    ratio: float
    cost_seconds: float
    since_step: int
    flagged_step: int
    cleared_step: int
    cleared_reason: str
    threshold: float
    node_wide: bool
    def __init__(self, cause: _Optional[str] = ..., ratio: _Optional[float] = ..., cost_seconds: _Optional[float] = ..., since_step: _Optional[int] = ..., flagged_step: _Optional[int] = ..., cleared_step: _Optional[int] = ..., cleared_reason: _Optional[str] = ..., threshold: _Optional[float] = ..., node_wide: _Optional[bool] = ...) -> None: ...

class SelfCheckFigures(_message.Message):
    __slots__ = ("matmul_gflops", "memory_gbps", "allreduce_gbps", "disk_mbps")
    MATMUL_GFLOPS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_GBPS_FIELD_NUMBER: _ClassVar[int]
    ALLREDUCE_GBPS_FIELD_NUMBER: _ClassVar[int]
    DISK_MBPS_FIELD_NUMBER: _ClassVar[int]
    matmul_gflops: float
    memory_gbps: float
    allreduce_gbps: float
    disk_mbps: float
    def __init__(self, matmul_gflops: _Optional[float] = ..., memory_gbps: _Optional[float] = ..., allreduce_gbps: _Optional[float] = ..., disk_mbps: _Optional[float] = ...) -> None: ...

class SelfCheckDetail(_message.Message):
    __slots__ = ("verdict", "node", "peers_median", "slow_measures", "seconds")
    class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VERDICT_UNSPECIFIED: _ClassVar[SelfCheckDetail.Verdict]
        VERDICT_OK: _ClassVar[SelfCheckDetail.Verdict]
        VERDICT_BELOW_PEERS: _ClassVar[SelfCheckDetail.Verdict]
        VERDICT_SLOW: _ClassVar[SelfCheckDetail.Verdict]
    VERDICT_UNSPECIFIED: SelfCheckDetail.Verdict
    VERDICT_OK: SelfCheckDetail.Verdict
    VERDICT_BELOW_PEERS: SelfCheckDetail.Verdict
    VERDICT_SLOW: SelfCheckDetail.Verdict
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    PEERS_MEDIAN_FIELD_NUMBER: _ClassVar[int]
    SLOW_MEASURES_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    verdict: SelfCheckDetail.Verdict
    node: SelfCheckFigures
    peers_median: SelfCheckFigures
    slow_measures: _containers.RepeatedScalarFieldContainer[str]
    seconds: float
    def __init__(self, verdict: _Optional[_Union[SelfCheckDetail.Verdict, str]] = ..., node: _Optional[_Union[SelfCheckFigures, _Mapping]] = ..., peers_median: _Optional[_Union[SelfCheckFigures, _Mapping]] = ..., slow_measures: _Optional[_Iterable[str]] = ..., seconds: _Optional[float] = ...) -> None: ...

class MergeDetail(_message.Message):
    __slots__ = ("phase", "method", "steps", "out", "val_loss", "input_val_losses")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[MergeDetail.Phase]
        PHASE_STARTED: _ClassVar[MergeDetail.Phase]
        PHASE_DONE: _ClassVar[MergeDetail.Phase]
        PHASE_FAILED: _ClassVar[MergeDetail.Phase]
        PHASE_CANCELLED: _ClassVar[MergeDetail.Phase]
    PHASE_UNSPECIFIED: MergeDetail.Phase
    PHASE_STARTED: MergeDetail.Phase
    PHASE_DONE: MergeDetail.Phase
    PHASE_FAILED: MergeDetail.Phase
    PHASE_CANCELLED: MergeDetail.Phase
    class InputValLossesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: float
        def __init__(self, key: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...
    PHASE_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    OUT_FIELD_NUMBER: _ClassVar[int]
    VAL_LOSS_FIELD_NUMBER: _ClassVar[int]
    INPUT_VAL_LOSSES_FIELD_NUMBER: _ClassVar[int]
    phase: MergeDetail.Phase
    method: str
    steps: _containers.RepeatedScalarFieldContainer[int]
    out: str
    val_loss: float
    input_val_losses: _containers.ScalarMap[int, float]
    def __init__(self, phase: _Optional[_Union[MergeDetail.Phase, str]] = ..., method: _Optional[str] = ..., steps: _Optional[_Iterable[int]] = ..., out: _Optional[str] = ..., val_loss: _Optional[float] = ..., input_val_losses: _Optional[_Mapping[int, float]] = ...) -> None: ...

class RunDetail(_message.Message):
    __slots__ = ("phase", "device", "parameters", "param_digest", "steps", "telemetry_dropped")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[RunDetail.Phase]
        PHASE_STARTED: _ClassVar[RunDetail.Phase]
        PHASE_FINISHED: _ClassVar[RunDetail.Phase]
        PHASE_NO_VALIDATION: _ClassVar[RunDetail.Phase]
    PHASE_UNSPECIFIED: RunDetail.Phase
    PHASE_STARTED: RunDetail.Phase
    PHASE_FINISHED: RunDetail.Phase
    PHASE_NO_VALIDATION: RunDetail.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PARAM_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_DROPPED_FIELD_NUMBER: _ClassVar[int]
    phase: RunDetail.Phase
    device: str
    parameters: int
    param_digest: str
    steps: int
    telemetry_dropped: int
    def __init__(self, phase: _Optional[_Union[RunDetail.Phase, str]] = ..., device: _Optional[str] = ..., parameters: _Optional[int] = ..., param_digest: _Optional[str] = ..., steps: _Optional[int] = ..., telemetry_dropped: _Optional[int] = ...) -> None: ...

class JobDetail(_message.Message):
    __slots__ = ("phase", "exit_code", "restarts", "max_restarts", "ranks")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[JobDetail.Phase]
        PHASE_STARTED: _ClassVar[JobDetail.Phase]
        PHASE_FINISHED: _ClassVar[JobDetail.Phase]
        PHASE_FAILED: _ClassVar[JobDetail.Phase]
        PHASE_PEER_FAILED: _ClassVar[JobDetail.Phase]
        PHASE_NODE_LEFT: _ClassVar[JobDetail.Phase]
        PHASE_NODE_EVICTED: _ClassVar[JobDetail.Phase]
    PHASE_UNSPECIFIED: JobDetail.Phase
    PHASE_STARTED: JobDetail.Phase
    PHASE_FINISHED: JobDetail.Phase
    PHASE_FAILED: JobDetail.Phase
    PHASE_PEER_FAILED: JobDetail.Phase
    PHASE_NODE_LEFT: JobDetail.Phase
    PHASE_NODE_EVICTED: JobDetail.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    MAX_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    RANKS_FIELD_NUMBER: _ClassVar[int]
    phase: JobDetail.Phase
    exit_code: int
    restarts: int
    max_restarts: int
    ranks: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, phase: _Optional[_Union[JobDetail.Phase, str]] = ..., exit_code: _Optional[int] = ..., restarts: _Optional[int] = ..., max_restarts: _Optional[int] = ..., ranks: _Optional[_Iterable[int]] = ...) -> None: ...

class FaultInjectedDetail(_message.Message):
    __slots__ = ("fault",)
    FAULT_FIELD_NUMBER: _ClassVar[int]
    fault: str
    def __init__(self, fault: _Optional[str] = ...) -> None: ...

class AgentLinkDetail(_message.Message):
    __slots__ = ("phase", "address")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        PHASE_UNSPECIFIED: _ClassVar[AgentLinkDetail.Phase]
        PHASE_CONNECTED: _ClassVar[AgentLinkDetail.Phase]
        PHASE_LOST: _ClassVar[AgentLinkDetail.Phase]
        PHASE_STOPPED: _ClassVar[AgentLinkDetail.Phase]
    PHASE_UNSPECIFIED: AgentLinkDetail.Phase
    PHASE_CONNECTED: AgentLinkDetail.Phase
    PHASE_LOST: AgentLinkDetail.Phase
    PHASE_STOPPED: AgentLinkDetail.Phase
    PHASE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    phase: AgentLinkDetail.Phase
    address: str
    def __init__(self, phase: _Optional[_Union[AgentLinkDetail.Phase, str]] = ..., address: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("rank", "pid", "state", "last_step", "last_heartbeat_wall_time", "collectives_issued", "restart_count", "exit_reason", "source", "last_progress_wall_time", "output_lines", "cpu_seconds")
    RANK_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    COLLECTIVES_ISSUED_FIELD_NUMBER: _ClassVar[int]
    RESTART_COUNT_FIELD_NUMBER: _ClassVar[int]
    EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    LAST_PROGRESS_WALL_TIME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LINES_FIELD_NUMBER: _ClassVar[int]
    CPU_SECONDS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    pid: int
    state: RankState
    last_step: int
    last_heartbeat_wall_time: float
    collectives_issued: int
    restart_count: int
    exit_reason: str
    source: RankSource
    last_progress_wall_time: float
    output_lines: int
    cpu_seconds: float
    def __init__(self, rank: _Optional[int] = ..., pid: _Optional[int] = ..., state: _Optional[_Union[RankState, str]] = ..., last_step: _Optional[int] = ..., last_heartbeat_wall_time: _Optional[float] = ..., collectives_issued: _Optional[int] = ..., restart_count: _Optional[int] = ..., exit_reason: _Optional[str] = ..., source: _Optional[_Union[RankSource, str]] = ..., last_progress_wall_time: _Optional[float] = ..., output_lines: _Optional[int] = ..., cpu_seconds: _Optional[float] = ...) -> None: ...

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

class LogLine(_message.Message):
    __slots__ = ("text", "stream", "seq")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STREAM_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    text: str
    stream: LogStream
    seq: int
    def __init__(self, text: _Optional[str] = ..., stream: _Optional[_Union[LogStream, str]] = ..., seq: _Optional[int] = ...) -> None: ...
