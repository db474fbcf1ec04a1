from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_F32: _ClassVar[Dtype]
    DTYPE_BF16: _ClassVar[Dtype]
    DTYPE_F16: _ClassVar[Dtype]

class OptimizerKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OPTIMIZER_KIND_UNSPECIFIED: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_SGD: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_ADAM: _ClassVar[OptimizerKind]
    OPTIMIZER_KIND_ADAMW: _ClassVar[OptimizerKind]

class NonFinitePolicy(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NON_FINITE_POLICY_SKIP: _ClassVar[NonFinitePolicy]
    NON_FINITE_POLICY_ERROR: _ClassVar[NonFinitePolicy]

class Membership(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MEMBERSHIP_FIXED: _ClassVar[Membership]
    MEMBERSHIP_ELASTIC: _ClassVar[Membership]

class Merge(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MERGE_MEAN: _ClassVar[Merge]
    MERGE_WEIGHTED: _ClassVar[Merge]
DTYPE_F32: Dtype
DTYPE_BF16: Dtype
DTYPE_F16: Dtype
OPTIMIZER_KIND_UNSPECIFIED: OptimizerKind
OPTIMIZER_KIND_SGD: OptimizerKind
OPTIMIZER_KIND_ADAM: OptimizerKind
OPTIMIZER_KIND_ADAMW: OptimizerKind
NON_FINITE_POLICY_SKIP: NonFinitePolicy
NON_FINITE_POLICY_ERROR: NonFinitePolicy
MEMBERSHIP_FIXED: Membership
MEMBERSHIP_ELASTIC: Membership
MERGE_MEAN: Merge
MERGE_WEIGHTED: Merge

class Segment(_message.Message):
    __slots__ = ("param", "offset", "data", "dtype")
    PARAM_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    param: str
    offset: int
    data: bytes
    dtype: Dtype
    def __init__(self, param: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., dtype: _Optional[_Union[Dtype, str]] = ...) -> None: ...

class ParamSpec(_message.Message):
    __slots__ = ("name", "shape")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ...) -> None: ...

class Hyperparameters(_message.Message):
    __slots__ = ("lr", "weight_decay", "momentum", "dampening", "nesterov", "beta1", "beta2", "eps", "amsgrad", "maximize")
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    DAMPENING_FIELD_NUMBER: _ClassVar[int]
    NESTEROV_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    AMSGRAD_FIELD_NUMBER: _ClassVar[int]
    MAXIMIZE_FIELD_NUMBER: _ClassVar[int]
    lr: float
    weight_decay: float
    momentum: float
    dampening: float
    nesterov: bool
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    maximize: bool
    def __init__(self, lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., momentum: _Optional[float] = ..., dampening: _Optional[float] = ..., nesterov: _Optional[bool] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., amsgrad: _Optional[bool] = ..., maximize: _Optional[bool] = ...) -> None: ...

class Optimizer(_message.Message):
    __slots__ = ("kind", "hyper")
    KIND_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    kind: OptimizerKind
    hyper: Hyperparameters
    def __init__(self, kind: _Optional[_Union[OptimizerKind, str]] = ..., hyper: _Optional[_Union[Hyperparameters, _Mapping]] = ...) -> None: ...

class ParamGroup(_message.Message):
    __slots__ = ("params", "hyper")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    HYPER_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedScalarFieldContainer[str]
    hyper: Hyperparameters
    def __init__(self, params: _Optional[_Iterable[str]] = ..., hyper: _Optional[_Union[Hyperparameters, _Mapping]] = ...) -> None: ...

class Schedule(_message.Message):
    __slots__ = ("constant", "warmup_cosine", "cosine_annealing")
    CONSTANT_FIELD_NUMBER: _ClassVar[int]
    WARMUP_COSINE_FIELD_NUMBER: _ClassVar[int]
    COSINE_ANNEALING_FIELD_NUMBER: _ClassVar[int]
    constant: Constant
    warmup_cosine: WarmupCosine
    cosine_annealing: CosineAnnealing
    def __init__(self, constant: _Optional[_Union[Constant, _Mapping]] = ..., warmup_cosine: _Optional[_Union[WarmupCosine, _Mapping]] = ..., cosine_annealing: _Optional[_Union[CosineAnnealing, _Mapping]] = ...) -> None: ...

class Constant(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class WarmupCosine(_message.Message):
    __slots__ = ("warmup_steps", "total_steps", "min_lr_ratio")
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MIN_LR_RATIO_FIELD_NUMBER: _ClassVar[int]
    warmup_steps: int
    total_steps: int
    min_lr_ratio: float
    def __init__(self, warmup_steps: _Optional[int] = ..., total_steps: _Optional[int] = ..., min_lr_ratio: _Optional[float] = ...) -> None: ...

class CosineAnnealing(_message.Message):
    __slots__ = ("t_max", "eta_min")
    T_MAX_FIELD_NUMBER: _ClassVar[int]
    ETA_MIN_FIELD_NUMBER: _ClassVar[int]
    t_max: int
    eta_min: float
    def __init__(self, t_max: _Optional[int] = ..., eta_min: _Optional[float] = ...) -> None: ...

class Clip(_message.Message):
    __slots__ = ("max_norm",)
    MAX_NORM_FIELD_NUMBER: _ClassVar[int]
    max_norm: float
    def __init__(self, max_norm: _Optional[float] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("params", "optimizer", "param_groups", "schedule", "clip", "workers", "non_finite", "worker_timeout_seconds", "backup_workers", "merge", "membership", "min_workers", "lease_seconds")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    PARAM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    WORKER_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BACKUP_WORKERS_FIELD_NUMBER: _ClassVar[int]
    MERGE_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    optimizer: Optimizer
    param_groups: _containers.RepeatedCompositeFieldContainer[ParamGroup]
    schedule: Schedule
    clip: Clip
    workers: int
    non_finite: NonFinitePolicy
    worker_timeout_seconds: float
    backup_workers: int
    merge: Merge
    membership: Membership
    min_workers: int
    lease_seconds: float
    def __init__(self, params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., optimizer: _Optional[_Union[Optimizer, _Mapping]] = ..., param_groups: _Optional[_Iterable[_Union[ParamGroup, _Mapping]]] = ..., schedule: _Optional[_Union[Schedule, _Mapping]] = ..., clip: _Optional[_Union[Clip, _Mapping]] = ..., workers: _Optional[int] = ..., non_finite: _Optional[_Union[NonFinitePolicy, str]] = ..., worker_timeout_seconds: _Optional[float] = ..., backup_workers: _Optional[int] = ..., merge: _Optional[_Union[Merge, str]] = ..., membership: _Optional[_Union[Membership, str]] = ..., min_workers: _Optional[int] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("worker", "lease", "lease_seconds", "round")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    worker: int
    lease: int
    lease_seconds: float
    round: int
    def __init__(self, worker: _Optional[int] = ..., lease: _Optional[int] = ..., lease_seconds: _Optional[float] = ..., round: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("job", "worker", "lease")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    lease: int
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., lease: _Optional[int] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("round", "lease_seconds")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    round: int
    lease_seconds: float
    def __init__(self, round: _Optional[int] = ..., lease_seconds: _Optional[float] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("job", "worker", "lease")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    lease: int
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., lease: _Optional[int] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InitRequest(_message.Message):
    __slots__ = ("job", "spec", "values")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    job: str
    spec: JobSpec
    values: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, job: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., values: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class InitResponse(_message.Message):
    __slots__ = ("round", "created")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    round: int
    created: bool
    def __init__(self, round: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("job", "worker", "round", "grads", "no_grad", "weight", "lease")
    JOB_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    GRADS_FIELD_NUMBER: _ClassVar[int]
    NO_GRAD_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    job: str
    worker: int
    round: int
    grads: _containers.RepeatedCompositeFieldContainer[Segment]
    no_grad: _containers.RepeatedScalarFieldContainer[str]
    weight: float
    lease: int
    def __init__(self, job: _Optional[str] = ..., worker: _Optional[int] = ..., round: _Optional[int] = ..., grads: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ..., no_grad: _Optional[_Iterable[str]] = ..., weight: _Optional[float] = ..., lease: _Optional[int] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("duplicate", "pushed")
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    PUSHED_FIELD_NUMBER: _ClassVar[int]
    duplicate: bool
    pushed: int
    def __init__(self, duplicate: _Optional[bool] = ..., pushed: _Optional[int] = ...) -> None: ...

class PullRequest(_message.Message):
    __slots__ = ("job", "round", "params", "dtype")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    params: _containers.RepeatedScalarFieldContainer[str]
    dtype: Dtype
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., params: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[Dtype, str]] = ...) -> None: ...

class RoundOutcome(_message.Message):
    __slots__ = ("round", "step", "skipped", "grad_norm", "clip_coefficient", "lr", "loaded_state", "participants")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    CLIP_COEFFICIENT_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    LOADED_STATE_FIELD_NUMBER: _ClassVar[int]
    PARTICIPANTS_FIELD_NUMBER: _ClassVar[int]
    round: int
    step: int
    skipped: bool
    grad_norm: float
    clip_coefficient: float
    lr: _containers.RepeatedScalarFieldContainer[float]
    loaded_state: int
    participants: int
    def __init__(self, round: _Optional[int] = ..., step: _Optional[int] = ..., skipped: _Optional[bool] = ..., grad_norm: _Optional[float] = ..., clip_coefficient: _Optional[float] = ..., lr: _Optional[_Iterable[float]] = ..., loaded_state: _Optional[int] = ..., participants: _Optional[int] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("round", "last", "params")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    round: int
    last: RoundOutcome
    params: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, round: _Optional[int] = ..., last: _Optional[_Union[RoundOutcome, _Mapping]] = ..., params: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class JobStatus(_message.Message):
    __slots__ = ("job", "round", "step", "workers_expected", "workers_pushed", "rounds_skipped", "last", "parameters", "parameter_bytes", "optimizer_state_bytes", "optimizer", "shards", "waiting_for", "members", "min_workers")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    WORKERS_EXPECTED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_PUSHED_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    WAITING_FOR_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    MIN_WORKERS_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    step: int
    workers_expected: int
    workers_pushed: int
    rounds_skipped: int
    last: RoundOutcome
    parameters: int
    parameter_bytes: int
    optimizer_state_bytes: int
    optimizer: str
    shards: _containers.RepeatedCompositeFieldContainer[ShardInfo]
    waiting_for: _containers.RepeatedScalarFieldContainer[int]
    members: _containers.RepeatedCompositeFieldContainer[Member]
    min_workers: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., step: _Optional[int] = ..., workers_expected: _Optional[int] = ..., workers_pushed: _Optional[int] = ..., rounds_skipped: _Optional[int] = ..., last: _Optional[_Union[RoundOutcome, _Mapping]] = ..., parameters: _Optional[int] = ..., parameter_bytes: _Optional[int] = ..., optimizer_state_bytes: _Optional[int] = ..., optimizer: _Optional[str] = ..., shards: _Optional[_Iterable[_Union[ShardInfo, _Mapping]]] = ..., waiting_for: _Optional[_Iterable[int]] = ..., members: _Optional[_Iterable[_Union[Member, _Mapping]]] = ..., min_workers: _Optional[int] = ...) -> None: ...

class Member(_message.Message):
    __slots__ = ("worker", "lease", "expires_in_seconds", "joined_round")
    WORKER_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    JOINED_ROUND_FIELD_NUMBER: _ClassVar[int]
    worker: int
    lease: int
    expires_in_seconds: float
    joined_round: int
    def __init__(self, worker: _Optional[int] = ..., lease: _Optional[int] = ..., expires_in_seconds: _Optional[float] = ..., joined_round: _Optional[int] = ...) -> None: ...

class ShardInfo(_message.Message):
    __slots__ = ("index", "address", "up", "chunks", "parameter_bytes", "optimizer_state_bytes", "round", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UP_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_STATE_BYTES_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    address: str
    up: bool
    chunks: int
    parameter_bytes: int
    optimizer_state_bytes: int
    round: int
    error: str
    def __init__(self, index: _Optional[int] = ..., address: _Optional[str] = ..., up: _Optional[bool] = ..., chunks: _Optional[int] = ..., parameter_bytes: _Optional[int] = ..., optimizer_state_bytes: _Optional[int] = ..., round: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("jobs", "rss_bytes", "peak_rss_bytes")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    PEAK_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[JobStatus]
    rss_bytes: int
    peak_rss_bytes: int
    def __init__(self, jobs: _Optional[_Iterable[_Union[JobStatus, _Mapping]]] = ..., rss_bytes: _Optional[int] = ..., peak_rss_bytes: _Optional[int] = ...) -> None: ...

class DeleteJobRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class DeleteJobResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LayoutRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class LayoutResponse(_message.Message):
    __slots__ = ("shards", "chunk_elems", "params", "owners")
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_ELEMS_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    OWNERS_FIELD_NUMBER: _ClassVar[int]
    shards: _containers.RepeatedScalarFieldContainer[str]
    chunk_elems: int
    params: _containers.RepeatedCompositeFieldContainer[ParamSpec]
    owners: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, shards: _Optional[_Iterable[str]] = ..., chunk_elems: _Optional[int] = ..., params: _Optional[_Iterable[_Union[ParamSpec, _Mapping]]] = ..., owners: _Optional[_Iterable[int]] = ...) -> None: ...

class CreateShardRequest(_message.Message):
    __slots__ = ("job", "spec", "shard", "layout", "values")
    JOB_FIELD_NUMBER: _ClassVar[int]
    SPEC_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    job: str
    spec: JobSpec
    shard: int
    layout: LayoutResponse
    values: _containers.RepeatedCompositeFieldContainer[Segment]
    def __init__(self, job: _Optional[str] = ..., spec: _Optional[_Union[JobSpec, _Mapping]] = ..., shard: _Optional[int] = ..., layout: _Optional[_Union[LayoutResponse, _Mapping]] = ..., values: _Optional[_Iterable[_Union[Segment, _Mapping]]] = ...) -> None: ...

class CreateShardResponse(_message.Message):
    __slots__ = ("round", "created")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    round: int
    created: bool
    def __init__(self, round: _Optional[int] = ..., created: _Optional[bool] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("job", "round", "shard", "chunks", "sum_squares", "non_finite", "load", "load_step")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SUM_SQUARES_FIELD_NUMBER: _ClassVar[int]
    NON_FINITE_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    LOAD_STEP_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    shard: int
    chunks: _containers.RepeatedScalarFieldContainer[int]
    sum_squares: _containers.RepeatedScalarFieldContainer[float]
    non_finite: bool
    load: int
    load_step: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., shard: _Optional[int] = ..., chunks: _Optional[_Iterable[int]] = ..., sum_squares: _Optional[_Iterable[float]] = ..., non_finite: _Optional[bool] = ..., load: _Optional[int] = ..., load_step: _Optional[int] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("decision",)
    DECISION_FIELD_NUMBER: _ClassVar[int]
    decision: RoundOutcome
    def __init__(self, decision: _Optional[_Union[RoundOutcome, _Mapping]] = ...) -> None: ...

class ShardStatusRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class ShardStatusResponse(_message.Message):
    __slots__ = ("shard",)
    SHARD_FIELD_NUMBER: _ClassVar[int]
    shard: ShardInfo
    def __init__(self, shard: _Optional[_Union[ShardInfo, _Mapping]] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class CheckpointedJob(_message.Message):
    __slots__ = ("job", "round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class CheckpointResponse(_message.Message):
    __slots__ = ("jobs",)
    JOBS_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[CheckpointedJob]
    def __init__(self, jobs: _Optional[_Iterable[_Union[CheckpointedJob, _Mapping]]] = ...) -> None: ...

class SaveShardRequest(_message.Message):
    __slots__ = ("job", "round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class SaveShardResponse(_message.Message):
    __slots__ = ("file", "sha256", "bytes")
    FILE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    file: str
    sha256: str
    bytes: int
    def __init__(self, file: _Optional[str] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class CommitShardRequest(_message.Message):
    __slots__ = ("job", "round", "manifest")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    manifest: Manifest
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., manifest: _Optional[_Union[Manifest, _Mapping]] = ...) -> None: ...

class CommitShardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Manifest(_message.Message):
    __slots__ = ("format", "job", "round", "shards", "files")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    format: str
    job: str
    round: int
    shards: int
    files: _containers.RepeatedCompositeFieldContainer[ManifestFile]
    def __init__(self, format: _Optional[str] = ..., job: _Optional[str] = ..., round: _Optional[int] = ..., shards: _Optional[int] = ..., files: _Optional[_Iterable[_Union[ManifestFile, _Mapping]]] = ...) -> None: ...

class ManifestFile(_message.Message):
    __slots__ = ("name", "sha256", "bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    sha256: str
    bytes: int
    def __init__(self, name: _Optional[str] = ..., sha256: _Optional[str] = ..., bytes: _Optional[int] = ...) -> None: ...

class DropShardRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class DropShardResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MembersRequest(_message.Message):
    __slots__ = ("job", "round", "shard", "workers", "leases")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    shard: int
    workers: _containers.RepeatedScalarFieldContainer[int]
    leases: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., shard: _Optional[int] = ..., workers: _Optional[_Iterable[int]] = ..., leases: _Optional[_Iterable[int]] = ...) -> None: ...

class MembersResponse(_message.Message):
    __slots__ = ("round", "workers", "dropped")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    round: int
    workers: _containers.RepeatedScalarFieldContainer[int]
    dropped: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, round: _Optional[int] = ..., workers: _Optional[_Iterable[int]] = ..., dropped: _Optional[_Iterable[int]] = ...) -> None: ...

class RestorableRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: str
    def __init__(self, job: _Optional[str] = ...) -> None: ...

class RestorableResponse(_message.Message):
    __slots__ = ("rounds", "round", "serving")
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SERVING_FIELD_NUMBER: _ClassVar[int]
    rounds: _containers.RepeatedScalarFieldContainer[int]
    round: int
    serving: bool
    def __init__(self, rounds: _Optional[_Iterable[int]] = ..., round: _Optional[int] = ..., serving: _Optional[bool] = ...) -> None: ...

class AdoptRequest(_message.Message):
    __slots__ = ("job", "round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class AdoptResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointFileRequest(_message.Message):
    __slots__ = ("job", "round", "name")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    name: str
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., name: _Optional[str] = ...) -> None: ...

class CheckpointFileChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class StateRequest(_message.Message):
    __slots__ = ("job", "round")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class StateResponse(_message.Message):
    __slots__ = ("round", "state")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    round: int
    state: _containers.RepeatedCompositeFieldContainer[StateSegment]
    def __init__(self, round: _Optional[int] = ..., state: _Optional[_Iterable[_Union[StateSegment, _Mapping]]] = ...) -> None: ...

class StateSegment(_message.Message):
    __slots__ = ("param", "buffer", "offset", "data", "step")
    PARAM_FIELD_NUMBER: _ClassVar[int]
    BUFFER_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    param: str
    buffer: str
    offset: int
    data: bytes
    step: int
    def __init__(self, param: _Optional[str] = ..., buffer: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., step: _Optional[int] = ...) -> None: ...

class LoadStateRequest(_message.Message):
    __slots__ = ("job", "round", "id", "step", "state")
    JOB_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    job: str
    round: int
    id: int
    step: int
    state: _containers.RepeatedCompositeFieldContainer[StateSegment]
    def __init__(self, job: _Optional[str] = ..., round: _Optional[int] = ..., id: _Optional[int] = ..., step: _Optional[int] = ..., state: _Optional[_Iterable[_Union[StateSegment, _Mapping]]] = ...) -> None: ...

class LoadStateResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
