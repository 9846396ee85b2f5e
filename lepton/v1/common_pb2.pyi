from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_INT16: _ClassVar[DType]
    DTYPE_INT8: _ClassVar[DType]
    DTYPE_UINT8: _ClassVar[DType]
    DTYPE_BOOL: _ClassVar[DType]

class TensorEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_ENCODING_UNSPECIFIED: _ClassVar[TensorEncoding]
    TENSOR_ENCODING_FP16: _ClassVar[TensorEncoding]
    TENSOR_ENCODING_BF16: _ClassVar[TensorEncoding]
    TENSOR_ENCODING_TOPK: _ClassVar[TensorEncoding]
    TENSOR_ENCODING_SIGN: _ClassVar[TensorEncoding]

class Role(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROLE_UNSPECIFIED: _ClassVar[Role]
    ROLE_PARAMETER_SERVER: _ClassVar[Role]
    ROLE_WORKER: _ClassVar[Role]

class ConsistencyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONSISTENCY_MODE_UNSPECIFIED: _ClassVar[ConsistencyMode]
    CONSISTENCY_MODE_ASYNC: _ClassVar[ConsistencyMode]
    CONSISTENCY_MODE_SYNC: _ClassVar[ConsistencyMode]
    CONSISTENCY_MODE_SSP: _ClassVar[ConsistencyMode]

class Task(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_UNSPECIFIED: _ClassVar[Task]
    TASK_CLASSIFICATION: _ClassVar[Task]
    TASK_REGRESSION: _ClassVar[Task]

class GradientCompression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GRADIENT_COMPRESSION_UNSPECIFIED: _ClassVar[GradientCompression]
    GRADIENT_COMPRESSION_NONE: _ClassVar[GradientCompression]
    GRADIENT_COMPRESSION_FP16: _ClassVar[GradientCompression]
    GRADIENT_COMPRESSION_BF16: _ClassVar[GradientCompression]
    GRADIENT_COMPRESSION_TOPK: _ClassVar[GradientCompression]
    GRADIENT_COMPRESSION_SIGN: _ClassVar[GradientCompression]

class TensorKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TENSOR_KIND_UNSPECIFIED: _ClassVar[TensorKind]
    TENSOR_KIND_PARAMETER: _ClassVar[TensorKind]
    TENSOR_KIND_FROZEN: _ClassVar[TensorKind]
    TENSOR_KIND_BUFFER: _ClassVar[TensorKind]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_INT16: DType
DTYPE_INT8: DType
DTYPE_UINT8: DType
DTYPE_BOOL: DType
TENSOR_ENCODING_UNSPECIFIED: TensorEncoding
TENSOR_ENCODING_FP16: TensorEncoding
TENSOR_ENCODING_BF16: TensorEncoding
TENSOR_ENCODING_TOPK: TensorEncoding
TENSOR_ENCODING_SIGN: TensorEncoding
ROLE_UNSPECIFIED: Role
ROLE_PARAMETER_SERVER: Role
ROLE_WORKER: Role
CONSISTENCY_MODE_UNSPECIFIED: ConsistencyMode
CONSISTENCY_MODE_ASYNC: ConsistencyMode
CONSISTENCY_MODE_SYNC: ConsistencyMode
CONSISTENCY_MODE_SSP: ConsistencyMode
TASK_UNSPECIFIED: Task
TASK_CLASSIFICATION: Task
TASK_REGRESSION: Task
GRADIENT_COMPRESSION_UNSPECIFIED: GradientCompression
GRADIENT_COMPRESSION_NONE: GradientCompression
GRADIENT_COMPRESSION_FP16: GradientCompression
GRADIENT_COMPRESSION_BF16: GradientCompression
GRADIENT_COMPRESSION_TOPK: GradientCompression
GRADIENT_COMPRESSION_SIGN: GradientCompression
TENSOR_KIND_UNSPECIFIED: TensorKind
TENSOR_KIND_PARAMETER: TensorKind
TENSOR_KIND_FROZEN: TensorKind
TENSOR_KIND_BUFFER: TensorKind

class TensorChunk(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset_bytes", "data", "encoding")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset_bytes: int
    data: bytes
    encoding: TensorEncoding
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset_bytes: _Optional[int] = ..., data: _Optional[bytes] = ..., encoding: _Optional[_Union[TensorEncoding, str]] = ...) -> None: ...

class MemberRef(_message.Message):
    __slots__ = ("member_id", "incarnation")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    incarnation: int
    def __init__(self, member_id: _Optional[str] = ..., incarnation: _Optional[int] = ...) -> None: ...

class OptimizerSpec(_message.Message):
    __slots__ = ("name", "learning_rate", "kwargs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    learning_rate: float
    kwargs: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., learning_rate: _Optional[float] = ..., kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("dataset", "model", "epochs", "batch_size", "optimizer", "mode", "shards_per_epoch", "heartbeat_interval_s", "heartbeat_timeout_s", "parameter_servers", "seed", "checkpoint_every_steps", "lr_schedule", "lr_schedule_kwargs", "staleness", "lease_timeout_s", "loss", "task", "async_lr_scaling", "eval_every_epochs", "early_stopping_metric", "early_stopping_patience", "feature_columns", "label_column", "device", "precision", "clip_grad_norm", "warmup_steps", "accumulate", "gradient_compression", "topk_ratio")
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    SHARDS_PER_EPOCH_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SERVERS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_EVERY_STEPS_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_FIELD_NUMBER: _ClassVar[int]
    LR_SCHEDULE_KWARGS_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    LEASE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    ASYNC_LR_SCALING_FIELD_NUMBER: _ClassVar[int]
    EVAL_EVERY_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_METRIC_FIELD_NUMBER: _ClassVar[int]
    EARLY_STOPPING_PATIENCE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_COLUMNS_FIELD_NUMBER: _ClassVar[int]
    LABEL_COLUMN_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    CLIP_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    WARMUP_STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    TOPK_RATIO_FIELD_NUMBER: _ClassVar[int]
    dataset: str
    model: str
    epochs: int
    batch_size: int
    optimizer: OptimizerSpec
    mode: ConsistencyMode
    shards_per_epoch: int
    heartbeat_interval_s: float
    heartbeat_timeout_s: float
    parameter_servers: int
    seed: int
    checkpoint_every_steps: int
    lr_schedule: str
    lr_schedule_kwargs: _struct_pb2.Struct
    staleness: int
    lease_timeout_s: float
    loss: str
    task: Task
    async_lr_scaling: str
    eval_every_epochs: int
    early_stopping_metric: str
    early_stopping_patience: int
    feature_columns: _containers.RepeatedScalarFieldContainer[str]
    label_column: str
    device: str
    precision: str
    clip_grad_norm: float
    warmup_steps: int
    accumulate: int
    gradient_compression: GradientCompression
    topk_ratio: float
    def __init__(self, dataset: _Optional[str] = ..., model: _Optional[str] = ..., epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., optimizer: _Optional[_Union[OptimizerSpec, _Mapping]] = ..., mode: _Optional[_Union[ConsistencyMode, str]] = ..., shards_per_epoch: _Optional[int] = ..., heartbeat_interval_s: _Optional[float] = ..., heartbeat_timeout_s: _Optional[float] = ..., parameter_servers: _Optional[int] = ..., seed: _Optional[int] = ..., checkpoint_every_steps: _Optional[int] = ..., lr_schedule: _Optional[str] = ..., lr_schedule_kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., staleness: _Optional[int] = ..., lease_timeout_s: _Optional[float] = ..., loss: _Optional[str] = ..., task: _Optional[_Union[Task, str]] = ..., async_lr_scaling: _Optional[str] = ..., eval_every_epochs: _Optional[int] = ..., early_stopping_metric: _Optional[str] = ..., early_stopping_patience: _Optional[int] = ..., feature_columns: _Optional[_Iterable[str]] = ..., label_column: _Optional[str] = ..., device: _Optional[str] = ..., precision: _Optional[str] = ..., clip_grad_norm: _Optional[float] = ..., warmup_steps: _Optional[int] = ..., accumulate: _Optional[int] = ..., gradient_compression: _Optional[_Union[GradientCompression, str]] = ..., topk_ratio: _Optional[float] = ...) -> None: ...

class TensorInfo(_message.Message):
    __slots__ = ("name", "dtype", "shape", "parameter", "row_offset", "parameter_shape", "sparse", "kind")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_FIELD_NUMBER: _ClassVar[int]
    ROW_OFFSET_FIELD_NUMBER: _ClassVar[int]
    PARAMETER_SHAPE_FIELD_NUMBER: _ClassVar[int]
    SPARSE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    parameter: str
    row_offset: int
    parameter_shape: _containers.RepeatedScalarFieldContainer[int]
    sparse: bool
    kind: TensorKind
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., parameter: _Optional[str] = ..., row_offset: _Optional[int] = ..., parameter_shape: _Optional[_Iterable[int]] = ..., sparse: _Optional[bool] = ..., kind: _Optional[_Union[TensorKind, str]] = ...) -> None: ...

class RowSelection(_message.Message):
    __slots__ = ("name", "rows")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    name: str
    rows: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., rows: _Optional[_Iterable[int]] = ...) -> None: ...
