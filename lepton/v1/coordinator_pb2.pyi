from lepton.v1 import common_pb2 as _common_pb2
from lepton.v1 import options_pb2 as _options_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_WAITING_FOR_SERVERS: _ClassVar[JobState]
    JOB_STATE_INITIALIZING: _ClassVar[JobState]
    JOB_STATE_TRAINING: _ClassVar[JobState]
    JOB_STATE_EVALUATING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]

class LeaseOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_OUTCOME_UNSPECIFIED: _ClassVar[LeaseOutcome]
    LEASE_OUTCOME_GRANTED: _ClassVar[LeaseOutcome]
    LEASE_OUTCOME_WAIT: _ClassVar[LeaseOutcome]
    LEASE_OUTCOME_EVALUATE: _ClassVar[LeaseOutcome]
    LEASE_OUTCOME_JOB_DONE: _ClassVar[LeaseOutcome]

class EventKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_KIND_UNSPECIFIED: _ClassVar[EventKind]
    EVENT_KIND_MEMBER_REGISTERED: _ClassVar[EventKind]
    EVENT_KIND_MEMBER_DECLARED_DEAD: _ClassVar[EventKind]
    EVENT_KIND_MEMBER_DEPARTED: _ClassVar[EventKind]
    EVENT_KIND_SHARD_LEASED: _ClassVar[EventKind]
    EVENT_KIND_SHARD_COMPLETED: _ClassVar[EventKind]
    EVENT_KIND_SHARD_REQUEUED: _ClassVar[EventKind]
    EVENT_KIND_DUPLICATE_COMPLETION_REJECTED: _ClassVar[EventKind]
    EVENT_KIND_EPOCH_STARTED: _ClassVar[EventKind]
    EVENT_KIND_JOB_STATE_CHANGED: _ClassVar[EventKind]
    EVENT_KIND_EVALUATED: _ClassVar[EventKind]
    EVENT_KIND_SHARD_QUARANTINED: _ClassVar[EventKind]
    EVENT_KIND_CHECKPOINT_REQUESTED: _ClassVar[EventKind]
    EVENT_KIND_CHECKPOINT_COMPLETED: _ClassVar[EventKind]
    EVENT_KIND_CHECKPOINT_FAILED: _ClassVar[EventKind]
    EVENT_KIND_EVALUATION_DECLINED: _ClassVar[EventKind]
    EVENT_KIND_VALIDATED: _ClassVar[EventKind]

class CheckpointState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_STATE_UNSPECIFIED: _ClassVar[CheckpointState]
    CHECKPOINT_STATE_PENDING: _ClassVar[CheckpointState]
    CHECKPOINT_STATE_COMPLETE: _ClassVar[CheckpointState]
    CHECKPOINT_STATE_FAILED: _ClassVar[CheckpointState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_WAITING_FOR_SERVERS: JobState
JOB_STATE_INITIALIZING: JobState
JOB_STATE_TRAINING: JobState
JOB_STATE_EVALUATING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
LEASE_OUTCOME_UNSPECIFIED: LeaseOutcome
LEASE_OUTCOME_GRANTED: LeaseOutcome
LEASE_OUTCOME_WAIT: LeaseOutcome
LEASE_OUTCOME_EVALUATE: LeaseOutcome
LEASE_OUTCOME_JOB_DONE: LeaseOutcome
EVENT_KIND_UNSPECIFIED: EventKind
EVENT_KIND_MEMBER_REGISTERED: EventKind
EVENT_KIND_MEMBER_DECLARED_DEAD: EventKind
EVENT_KIND_MEMBER_DEPARTED: EventKind
EVENT_KIND_SHARD_LEASED: EventKind
EVENT_KIND_SHARD_COMPLETED: EventKind
EVENT_KIND_SHARD_REQUEUED: EventKind
EVENT_KIND_DUPLICATE_COMPLETION_REJECTED: EventKind
EVENT_KIND_EPOCH_STARTED: EventKind
EVENT_KIND_JOB_STATE_CHANGED: EventKind
EVENT_KIND_EVALUATED: EventKind
EVENT_KIND_SHARD_QUARANTINED: EventKind
EVENT_KIND_CHECKPOINT_REQUESTED: EventKind
EVENT_KIND_CHECKPOINT_COMPLETED: EventKind
EVENT_KIND_CHECKPOINT_FAILED: EventKind
EVENT_KIND_EVALUATION_DECLINED: EventKind
EVENT_KIND_VALIDATED: EventKind
CHECKPOINT_STATE_UNSPECIFIED: CheckpointState
CHECKPOINT_STATE_PENDING: CheckpointState
CHECKPOINT_STATE_COMPLETE: CheckpointState
CHECKPOINT_STATE_FAILED: CheckpointState

class RegisterMemberRequest(_message.Message):
    __slots__ = ("role", "address", "member_id", "hostname", "pid", "instance")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    role: _common_pb2.Role
    address: str
    member_id: str
    hostname: str
    pid: int
    instance: str
    def __init__(self, role: _Optional[_Union[_common_pb2.Role, str]] = ..., address: _Optional[str] = ..., member_id: _Optional[str] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class RegisterMemberResponse(_message.Message):
    __slots__ = ("member", "job")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    JOB_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    job: _common_pb2.JobSpec
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., job: _Optional[_Union[_common_pb2.JobSpec, _Mapping]] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("member", "version", "roster_version", "checkpoint")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ROSTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    version: int
    roster_version: int
    checkpoint: CheckpointReport
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., version: _Optional[int] = ..., roster_version: _Optional[int] = ..., checkpoint: _Optional[_Union[CheckpointReport, _Mapping]] = ...) -> None: ...

class CheckpointReport(_message.Message):
    __slots__ = ("checkpoint_id", "target_version", "version", "path", "missed", "error")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    MISSED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    target_version: int
    version: int
    path: str
    missed: bool
    error: str
    def __init__(self, checkpoint_id: _Optional[str] = ..., target_version: _Optional[int] = ..., version: _Optional[int] = ..., path: _Optional[str] = ..., missed: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...

class CheckpointOrder(_message.Message):
    __slots__ = ("checkpoint_id", "target_version")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    target_version: int
    def __init__(self, checkpoint_id: _Optional[str] = ..., target_version: _Optional[int] = ...) -> None: ...

class WorkerMembership(_message.Message):
    __slots__ = ("member_id", "incarnation", "alive")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    incarnation: int
    alive: bool
    def __init__(self, member_id: _Optional[str] = ..., incarnation: _Optional[int] = ..., alive: _Optional[bool] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("job_state", "layout_version", "workers", "roster_version", "checkpoint", "heartbeat_interval_s")
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    ROSTER_VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    job_state: JobState
    layout_version: int
    workers: _containers.RepeatedCompositeFieldContainer[WorkerMembership]
    roster_version: int
    checkpoint: CheckpointOrder
    heartbeat_interval_s: float
    def __init__(self, job_state: _Optional[_Union[JobState, str]] = ..., layout_version: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[WorkerMembership, _Mapping]]] = ..., roster_version: _Optional[int] = ..., checkpoint: _Optional[_Union[CheckpointOrder, _Mapping]] = ..., heartbeat_interval_s: _Optional[float] = ...) -> None: ...

class HeartbeatStreamRequest(_message.Message):
    __slots__ = ("heartbeat",)
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    heartbeat: HeartbeatRequest
    def __init__(self, heartbeat: _Optional[_Union[HeartbeatRequest, _Mapping]] = ...) -> None: ...

class HeartbeatStreamResponse(_message.Message):
    __slots__ = ("heartbeat",)
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    heartbeat: HeartbeatResponse
    def __init__(self, heartbeat: _Optional[_Union[HeartbeatResponse, _Mapping]] = ...) -> None: ...

class DeregisterRequest(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ...) -> None: ...

class DeregisterResponse(_message.Message):
    __slots__ = ("shards_requeued",)
    SHARDS_REQUEUED_FIELD_NUMBER: _ClassVar[int]
    shards_requeued: int
    def __init__(self, shards_requeued: _Optional[int] = ...) -> None: ...

class GetAssignmentRequest(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ...) -> None: ...

class GetAssignmentResponse(_message.Message):
    __slots__ = ("layout_version", "tensors", "optimizer", "mode", "chunks")
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    layout_version: int
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorInfo]
    optimizer: _common_pb2.OptimizerSpec
    mode: _common_pb2.ConsistencyMode
    chunks: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorChunk]
    def __init__(self, layout_version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.TensorInfo, _Mapping]]] = ..., optimizer: _Optional[_Union[_common_pb2.OptimizerSpec, _Mapping]] = ..., mode: _Optional[_Union[_common_pb2.ConsistencyMode, str]] = ..., chunks: _Optional[_Iterable[_Union[_common_pb2.TensorChunk, _Mapping]]] = ...) -> None: ...

class ReportReadyRequest(_message.Message):
    __slots__ = ("member", "layout_version", "version")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    layout_version: int
    version: int
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., layout_version: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class ReportReadyResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetLayoutRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerAssignment(_message.Message):
    __slots__ = ("member_id", "address", "tensors")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    address: str
    tensors: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorInfo]
    def __init__(self, member_id: _Optional[str] = ..., address: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[_common_pb2.TensorInfo, _Mapping]]] = ...) -> None: ...

class GetLayoutResponse(_message.Message):
    __slots__ = ("layout_version", "servers")
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    layout_version: int
    servers: _containers.RepeatedCompositeFieldContainer[ServerAssignment]
    def __init__(self, layout_version: _Optional[int] = ..., servers: _Optional[_Iterable[_Union[ServerAssignment, _Mapping]]] = ...) -> None: ...

class LeaseShardRequest(_message.Message):
    __slots__ = ("member", "max_wait_s")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    MAX_WAIT_S_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    max_wait_s: float
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., max_wait_s: _Optional[float] = ...) -> None: ...

class ShardLease(_message.Message):
    __slots__ = ("epoch", "shard", "start", "end", "offset", "lease_id")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    shard: int
    start: int
    end: int
    offset: int
    lease_id: int
    def __init__(self, epoch: _Optional[int] = ..., shard: _Optional[int] = ..., start: _Optional[int] = ..., end: _Optional[int] = ..., offset: _Optional[int] = ..., lease_id: _Optional[int] = ...) -> None: ...

class LeaseShardResponse(_message.Message):
    __slots__ = ("outcome", "lease", "retry_after_s", "lease_timeout_s")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    outcome: LeaseOutcome
    lease: ShardLease
    retry_after_s: float
    lease_timeout_s: float
    def __init__(self, outcome: _Optional[_Union[LeaseOutcome, str]] = ..., lease: _Optional[_Union[ShardLease, _Mapping]] = ..., retry_after_s: _Optional[float] = ..., lease_timeout_s: _Optional[float] = ...) -> None: ...

class ReportProgressRequest(_message.Message):
    __slots__ = ("member", "epoch", "shard", "offset", "loss", "samples", "lease_id", "loss_unknown")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    epoch: int
    shard: int
    offset: int
    loss: float
    samples: int
    lease_id: int
    loss_unknown: bool
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., epoch: _Optional[int] = ..., shard: _Optional[int] = ..., offset: _Optional[int] = ..., loss: _Optional[float] = ..., samples: _Optional[int] = ..., lease_id: _Optional[int] = ..., loss_unknown: _Optional[bool] = ...) -> None: ...

class ReportProgressResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CompleteShardRequest(_message.Message):
    __slots__ = ("member", "epoch", "shard", "loss", "samples", "lease_id", "loss_unknown")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_UNKNOWN_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    epoch: int
    shard: int
    loss: float
    samples: int
    lease_id: int
    loss_unknown: bool
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., epoch: _Optional[int] = ..., shard: _Optional[int] = ..., loss: _Optional[float] = ..., samples: _Optional[int] = ..., lease_id: _Optional[int] = ..., loss_unknown: _Optional[bool] = ...) -> None: ...

class CompleteShardResponse(_message.Message):
    __slots__ = ("epoch_completed",)
    EPOCH_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    epoch_completed: bool
    def __init__(self, epoch_completed: _Optional[bool] = ...) -> None: ...

class ReportEvaluationRequest(_message.Message):
    __slots__ = ("member", "accuracy", "macro_recall", "loss", "samples", "inference_samples_per_second", "classification", "regression", "model_version")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MACRO_RECALL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    REGRESSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    accuracy: float
    macro_recall: float
    loss: float
    samples: int
    inference_samples_per_second: float
    classification: ClassificationMetrics
    regression: RegressionMetrics
    model_version: int
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., accuracy: _Optional[float] = ..., macro_recall: _Optional[float] = ..., loss: _Optional[float] = ..., samples: _Optional[int] = ..., inference_samples_per_second: _Optional[float] = ..., classification: _Optional[_Union[ClassificationMetrics, _Mapping]] = ..., regression: _Optional[_Union[RegressionMetrics, _Mapping]] = ..., model_version: _Optional[int] = ...) -> None: ...

class ClassificationMetrics(_message.Message):
    __slots__ = ("per_class_recall", "num_classes", "confusion_matrix")
    PER_CLASS_RECALL_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    CONFUSION_MATRIX_FIELD_NUMBER: _ClassVar[int]
    per_class_recall: _containers.RepeatedScalarFieldContainer[float]
    num_classes: int
    confusion_matrix: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, per_class_recall: _Optional[_Iterable[float]] = ..., num_classes: _Optional[int] = ..., confusion_matrix: _Optional[_Iterable[int]] = ...) -> None: ...

class RegressionMetrics(_message.Message):
    __slots__ = ("mse", "mae", "r2")
    MSE_FIELD_NUMBER: _ClassVar[int]
    MAE_FIELD_NUMBER: _ClassVar[int]
    R2_FIELD_NUMBER: _ClassVar[int]
    mse: float
    mae: float
    r2: float
    def __init__(self, mse: _Optional[float] = ..., mae: _Optional[float] = ..., r2: _Optional[float] = ...) -> None: ...

class ReportEvaluationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DeclineEvaluationRequest(_message.Message):
    __slots__ = ("member", "reason")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    reason: str
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class DeclineEvaluationResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MemberStatus(_message.Message):
    __slots__ = ("member", "role", "address", "alive", "last_heartbeat_age_s", "lease", "has_lease", "hostname", "pid", "instance")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ALIVE_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_AGE_S_FIELD_NUMBER: _ClassVar[int]
    LEASE_FIELD_NUMBER: _ClassVar[int]
    HAS_LEASE_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    role: _common_pb2.Role
    address: str
    alive: bool
    last_heartbeat_age_s: float
    lease: ShardLease
    has_lease: bool
    hostname: str
    pid: int
    instance: str
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., role: _Optional[_Union[_common_pb2.Role, str]] = ..., address: _Optional[str] = ..., alive: _Optional[bool] = ..., last_heartbeat_age_s: _Optional[float] = ..., lease: _Optional[_Union[ShardLease, _Mapping]] = ..., has_lease: _Optional[bool] = ..., hostname: _Optional[str] = ..., pid: _Optional[int] = ..., instance: _Optional[str] = ...) -> None: ...

class EvaluationResult(_message.Message):
    __slots__ = ("accuracy", "macro_recall", "loss", "samples", "inference_samples_per_second", "classification", "regression")
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    MACRO_RECALL_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    CLASSIFICATION_FIELD_NUMBER: _ClassVar[int]
    REGRESSION_FIELD_NUMBER: _ClassVar[int]
    accuracy: float
    macro_recall: float
    loss: float
    samples: int
    inference_samples_per_second: float
    classification: ClassificationMetrics
    regression: RegressionMetrics
    def __init__(self, accuracy: _Optional[float] = ..., macro_recall: _Optional[float] = ..., loss: _Optional[float] = ..., samples: _Optional[int] = ..., inference_samples_per_second: _Optional[float] = ..., classification: _Optional[_Union[ClassificationMetrics, _Mapping]] = ..., regression: _Optional[_Union[RegressionMetrics, _Mapping]] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("job", "state", "epoch", "shards_completed_in_epoch", "shards_leased", "shards_pending", "shard_completions", "duplicate_completions_rejected", "reassignments", "members_declared_dead", "samples_trained", "samples_per_second", "recent_loss", "members", "evaluation", "has_evaluation", "training_seconds", "layout_version", "failure", "ps_restarts", "steps_rolled_back", "quarantined_shards", "leases_expired", "last_checkpoint", "validation", "stopped_early")
    JOB_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARDS_COMPLETED_IN_EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARDS_LEASED_FIELD_NUMBER: _ClassVar[int]
    SHARDS_PENDING_FIELD_NUMBER: _ClassVar[int]
    SHARD_COMPLETIONS_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_COMPLETIONS_REJECTED_FIELD_NUMBER: _ClassVar[int]
    REASSIGNMENTS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_DECLARED_DEAD_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_PER_SECOND_FIELD_NUMBER: _ClassVar[int]
    RECENT_LOSS_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    HAS_EVALUATION_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_VERSION_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    PS_RESTARTS_FIELD_NUMBER: _ClassVar[int]
    STEPS_ROLLED_BACK_FIELD_NUMBER: _ClassVar[int]
    QUARANTINED_SHARDS_FIELD_NUMBER: _ClassVar[int]
    LEASES_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    LAST_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    STOPPED_EARLY_FIELD_NUMBER: _ClassVar[int]
    job: _common_pb2.JobSpec
    state: JobState
    epoch: int
    shards_completed_in_epoch: int
    shards_leased: int
    shards_pending: int
    shard_completions: int
    duplicate_completions_rejected: int
    reassignments: int
    members_declared_dead: int
    samples_trained: int
    samples_per_second: float
    recent_loss: float
    members: _containers.RepeatedCompositeFieldContainer[MemberStatus]
    evaluation: EvaluationResult
    has_evaluation: bool
    training_seconds: float
    layout_version: int
    failure: str
    ps_restarts: int
    steps_rolled_back: int
    quarantined_shards: _containers.RepeatedScalarFieldContainer[int]
    leases_expired: int
    last_checkpoint: CheckpointManifest
    validation: _containers.RepeatedCompositeFieldContainer[ValidationRecord]
    stopped_early: str
    def __init__(self, job: _Optional[_Union[_common_pb2.JobSpec, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., epoch: _Optional[int] = ..., shards_completed_in_epoch: _Optional[int] = ..., shards_leased: _Optional[int] = ..., shards_pending: _Optional[int] = ..., shard_completions: _Optional[int] = ..., duplicate_completions_rejected: _Optional[int] = ..., reassignments: _Optional[int] = ..., members_declared_dead: _Optional[int] = ..., samples_trained: _Optional[int] = ..., samples_per_second: _Optional[float] = ..., recent_loss: _Optional[float] = ..., members: _Optional[_Iterable[_Union[MemberStatus, _Mapping]]] = ..., evaluation: _Optional[_Union[EvaluationResult, _Mapping]] = ..., has_evaluation: _Optional[bool] = ..., training_seconds: _Optional[float] = ..., layout_version: _Optional[int] = ..., failure: _Optional[str] = ..., ps_restarts: _Optional[int] = ..., steps_rolled_back: _Optional[int] = ..., quarantined_shards: _Optional[_Iterable[int]] = ..., leases_expired: _Optional[int] = ..., last_checkpoint: _Optional[_Union[CheckpointManifest, _Mapping]] = ..., validation: _Optional[_Iterable[_Union[ValidationRecord, _Mapping]]] = ..., stopped_early: _Optional[str] = ...) -> None: ...

class ValidationRecord(_message.Message):
    __slots__ = ("epoch", "step", "samples_trained", "training_seconds", "time_unix_s", "evaluation", "final")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_TRAINED_FIELD_NUMBER: _ClassVar[int]
    TRAINING_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EVALUATION_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    step: int
    samples_trained: int
    training_seconds: float
    time_unix_s: float
    evaluation: EvaluationResult
    final: bool
    def __init__(self, epoch: _Optional[int] = ..., step: _Optional[int] = ..., samples_trained: _Optional[int] = ..., training_seconds: _Optional[float] = ..., time_unix_s: _Optional[float] = ..., evaluation: _Optional[_Union[EvaluationResult, _Mapping]] = ..., final: _Optional[bool] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("after_sequence",)
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    after_sequence: int
    def __init__(self, after_sequence: _Optional[int] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("sequence", "time_unix_s", "kind", "member", "epoch", "shard", "offset", "job_state", "loss", "message", "validation")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SHARD_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    JOB_STATE_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    VALIDATION_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    time_unix_s: float
    kind: EventKind
    member: _common_pb2.MemberRef
    epoch: int
    shard: int
    offset: int
    job_state: JobState
    loss: float
    message: str
    validation: ValidationRecord
    def __init__(self, sequence: _Optional[int] = ..., time_unix_s: _Optional[float] = ..., kind: _Optional[_Union[EventKind, str]] = ..., member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., epoch: _Optional[int] = ..., shard: _Optional[int] = ..., offset: _Optional[int] = ..., job_state: _Optional[_Union[JobState, str]] = ..., loss: _Optional[float] = ..., message: _Optional[str] = ..., validation: _Optional[_Union[ValidationRecord, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    def __init__(self, state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class ReportFailureRequest(_message.Message):
    __slots__ = ("member", "reason")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    reason: str
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class ReportFailureResponse(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: JobState
    def __init__(self, state: _Optional[_Union[JobState, str]] = ...) -> None: ...

class RequestCheckpointRequest(_message.Message):
    __slots__ = ("reason",)
    REASON_FIELD_NUMBER: _ClassVar[int]
    reason: str
    def __init__(self, reason: _Optional[str] = ...) -> None: ...

class RequestCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint_id", "coalesced", "target_version")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    COALESCED_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    coalesced: bool
    target_version: int
    def __init__(self, checkpoint_id: _Optional[str] = ..., coalesced: _Optional[bool] = ..., target_version: _Optional[int] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("checkpoint_id",)
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    def __init__(self, checkpoint_id: _Optional[str] = ...) -> None: ...

class GetCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: CheckpointManifest
    def __init__(self, checkpoint: _Optional[_Union[CheckpointManifest, _Mapping]] = ...) -> None: ...

class ServerCheckpoint(_message.Message):
    __slots__ = ("member_id", "version", "path", "tensors")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    version: int
    path: str
    tensors: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, member_id: _Optional[str] = ..., version: _Optional[int] = ..., path: _Optional[str] = ..., tensors: _Optional[_Iterable[str]] = ...) -> None: ...

class CheckpointManifest(_message.Message):
    __slots__ = ("checkpoint_id", "state", "reason", "servers", "target_version", "consistent", "final", "error", "requested_unix_s", "completed_unix_s", "completed_after_s", "manifest_path")
    CHECKPOINT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    TARGET_VERSION_FIELD_NUMBER: _ClassVar[int]
    CONSISTENT_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REQUESTED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_PATH_FIELD_NUMBER: _ClassVar[int]
    checkpoint_id: str
    state: CheckpointState
    reason: str
    servers: _containers.RepeatedCompositeFieldContainer[ServerCheckpoint]
    target_version: int
    consistent: bool
    final: bool
    error: str
    requested_unix_s: float
    completed_unix_s: float
    completed_after_s: float
    manifest_path: str
    def __init__(self, checkpoint_id: _Optional[str] = ..., state: _Optional[_Union[CheckpointState, str]] = ..., reason: _Optional[str] = ..., servers: _Optional[_Iterable[_Union[ServerCheckpoint, _Mapping]]] = ..., target_version: _Optional[int] = ..., consistent: _Optional[bool] = ..., final: _Optional[bool] = ..., error: _Optional[str] = ..., requested_unix_s: _Optional[float] = ..., completed_unix_s: _Optional[float] = ..., completed_after_s: _Optional[float] = ..., manifest_path: _Optional[str] = ...) -> None: ...
