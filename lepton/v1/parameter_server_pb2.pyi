from lepton.v1 import common_pb2 as _common_pb2
from lepton.v1 import options_pb2 as _options_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PushOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PUSH_OUTCOME_UNSPECIFIED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_APPLIED: _ClassVar[PushOutcome]
    PUSH_OUTCOME_STALE: _ClassVar[PushOutcome]
PUSH_OUTCOME_UNSPECIFIED: PushOutcome
PUSH_OUTCOME_APPLIED: PushOutcome
PUSH_OUTCOME_STALE: PushOutcome

class PullRequest(_message.Message):
    __slots__ = ("member", "names", "rows")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    NAMES_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    names: _containers.RepeatedScalarFieldContainer[str]
    rows: _containers.RepeatedCompositeFieldContainer[_common_pb2.RowSelection]
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., names: _Optional[_Iterable[str]] = ..., rows: _Optional[_Iterable[_Union[_common_pb2.RowSelection, _Mapping]]] = ...) -> None: ...

class PullResponse(_message.Message):
    __slots__ = ("version", "chunks", "push")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    PUSH_FIELD_NUMBER: _ClassVar[int]
    version: int
    chunks: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorChunk]
    push: PushResponse
    def __init__(self, version: _Optional[int] = ..., chunks: _Optional[_Iterable[_Union[_common_pb2.TensorChunk, _Mapping]]] = ..., push: _Optional[_Union[PushResponse, _Mapping]] = ...) -> None: ...

class PushHeader(_message.Message):
    __slots__ = ("member", "base_version", "sample_count", "request_id", "rows", "tensors")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    BASE_VERSION_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    base_version: int
    sample_count: int
    request_id: str
    rows: _containers.RepeatedCompositeFieldContainer[_common_pb2.RowSelection]
    tensors: int
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., base_version: _Optional[int] = ..., sample_count: _Optional[int] = ..., request_id: _Optional[str] = ..., rows: _Optional[_Iterable[_Union[_common_pb2.RowSelection, _Mapping]]] = ..., tensors: _Optional[int] = ...) -> None: ...

class PushRequest(_message.Message):
    __slots__ = ("header", "chunks")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    chunks: _containers.RepeatedCompositeFieldContainer[_common_pb2.TensorChunk]
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., chunks: _Optional[_Iterable[_Union[_common_pb2.TensorChunk, _Mapping]]] = ...) -> None: ...

class PushResponse(_message.Message):
    __slots__ = ("outcome", "version", "staleness")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    STALENESS_FIELD_NUMBER: _ClassVar[int]
    outcome: PushOutcome
    version: int
    staleness: int
    def __init__(self, outcome: _Optional[_Union[PushOutcome, str]] = ..., version: _Optional[int] = ..., staleness: _Optional[int] = ...) -> None: ...

class LeaveStepsRequest(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ...) -> None: ...

class LeaveStepsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class JoinStepsRequest(_message.Message):
    __slots__ = ("member", "from_version")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    FROM_VERSION_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    from_version: int
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., from_version: _Optional[int] = ...) -> None: ...

class JoinStepsResponse(_message.Message):
    __slots__ = ("joined", "version")
    JOINED_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    joined: bool
    version: int
    def __init__(self, joined: _Optional[bool] = ..., version: _Optional[int] = ...) -> None: ...

class GetServerStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerStatusResponse(_message.Message):
    __slots__ = ("member_id", "version", "updates_applied", "pushes_received", "pushes_stale", "pushes_rejected", "steps_timed_out", "max_staleness", "mean_staleness", "bytes_pulled", "bytes_pushed", "mode", "max_clock_gap", "max_compute_gap")
    MEMBER_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPDATES_APPLIED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    PUSHES_STALE_FIELD_NUMBER: _ClassVar[int]
    PUSHES_REJECTED_FIELD_NUMBER: _ClassVar[int]
    STEPS_TIMED_OUT_FIELD_NUMBER: _ClassVar[int]
    MAX_STALENESS_FIELD_NUMBER: _ClassVar[int]
    MEAN_STALENESS_FIELD_NUMBER: _ClassVar[int]
    BYTES_PULLED_FIELD_NUMBER: _ClassVar[int]
    BYTES_PUSHED_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    MAX_CLOCK_GAP_FIELD_NUMBER: _ClassVar[int]
    MAX_COMPUTE_GAP_FIELD_NUMBER: _ClassVar[int]
    member_id: str
    version: int
    updates_applied: int
    pushes_received: int
    pushes_stale: int
    pushes_rejected: int
    steps_timed_out: int
    max_staleness: int
    mean_staleness: float
    bytes_pulled: int
    bytes_pushed: int
    mode: _common_pb2.ConsistencyMode
    max_clock_gap: int
    max_compute_gap: int
    def __init__(self, member_id: _Optional[str] = ..., version: _Optional[int] = ..., updates_applied: _Optional[int] = ..., pushes_received: _Optional[int] = ..., pushes_stale: _Optional[int] = ..., pushes_rejected: _Optional[int] = ..., steps_timed_out: _Optional[int] = ..., max_staleness: _Optional[int] = ..., mean_staleness: _Optional[float] = ..., bytes_pulled: _Optional[int] = ..., bytes_pushed: _Optional[int] = ..., mode: _Optional[_Union[_common_pb2.ConsistencyMode, str]] = ..., max_clock_gap: _Optional[int] = ..., max_compute_gap: _Optional[int] = ...) -> None: ...

class OpenSharedMemoryRequest(_message.Message):
    __slots__ = ("member",)
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ...) -> None: ...

class SharedTensor(_message.Message):
    __slots__ = ("name", "dtype", "shape", "offset_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _common_pb2.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset_bytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_common_pb2.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset_bytes: _Optional[int] = ...) -> None: ...

class OpenSharedMemoryResponse(_message.Message):
    __slots__ = ("session_id", "gradients_segment", "parameters_segment", "segment_bytes", "tensors")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    GRADIENTS_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    gradients_segment: str
    parameters_segment: str
    segment_bytes: int
    tensors: _containers.RepeatedCompositeFieldContainer[SharedTensor]
    def __init__(self, session_id: _Optional[str] = ..., gradients_segment: _Optional[str] = ..., parameters_segment: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[SharedTensor, _Mapping]]] = ...) -> None: ...

class PushPullSharedRequest(_message.Message):
    __slots__ = ("header", "session_id", "nonce", "tensors")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    header: PushHeader
    session_id: str
    nonce: bytes
    tensors: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, header: _Optional[_Union[PushHeader, _Mapping]] = ..., session_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., tensors: _Optional[_Iterable[int]] = ...) -> None: ...

class PushPullSharedResponse(_message.Message):
    __slots__ = ("push", "version")
    PUSH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    push: PushResponse
    version: int
    def __init__(self, push: _Optional[_Union[PushResponse, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class CloseSharedMemoryRequest(_message.Message):
    __slots__ = ("member", "session_id")
    MEMBER_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    member: _common_pb2.MemberRef
    session_id: str
    def __init__(self, member: _Optional[_Union[_common_pb2.MemberRef, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class CloseSharedMemoryResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
