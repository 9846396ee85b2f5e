"""The tensor codec: torch tensors to ``TensorChunk`` messages and back.

Wire layout (documented for other languages in ``protos/lepton/v1/common.proto``): row-major bytes,
each element little-endian, split into chunks of at most ``chunk_bytes`` that arrive in offset order.
Every read of a protobuf ``bytes`` field copies, so each chunk's ``data`` is read exactly once.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping

import torch

from lepton import encodings
from lepton.errors import InvalidArgument
from lepton.tensors import TensorSpec, check_rows  # noqa: F401  (TensorSpec re-exported for receivers)
from lepton.v1 import common_pb2 as pb

DEFAULT_CHUNK_BYTES = 1 << 20  # 1 MiB: the fastest chunk size measured with the generated classes
# The data plane's streams (hand codec, lepton.data_wire): fewer, larger messages cost less of
# grpc's per-message work; well inside the 8 MiB default receive limit (docs/performance.md).
STREAM_CHUNK_BYTES = 4 << 20

_TORCH_TO_WIRE: dict[torch.dtype, pb.DType] = {
    torch.float32: pb.DTYPE_FLOAT32,
    torch.float64: pb.DTYPE_FLOAT64,
    torch.float16: pb.DTYPE_FLOAT16,
    torch.bfloat16: pb.DTYPE_BFLOAT16,
    torch.int64: pb.DTYPE_INT64,
    torch.int32: pb.DTYPE_INT32,
    torch.int16: pb.DTYPE_INT16,
    torch.int8: pb.DTYPE_INT8,
    torch.uint8: pb.DTYPE_UINT8,
    torch.bool: pb.DTYPE_BOOL,
}
_WIRE_TO_TORCH: dict[int, torch.dtype] = {v: k for k, v in _TORCH_TO_WIRE.items()}
_BIG_ENDIAN_HOST = sys.byteorder == "big"

# torch.frombuffer warns that received bytes are read-only; we only ever copy out of them.
warnings.filterwarnings("ignore", message="The given buffer is not writable")


def wire_dtype(dtype: torch.dtype) -> pb.DType:
    """The ``DType`` enum value of a torch dtype. Raises InvalidArgument for unsupported dtypes."""
    try:
        return _TORCH_TO_WIRE[dtype]
    except KeyError:
        raise InvalidArgument(f"dtype {dtype} cannot travel on the wire") from None


def torch_dtype(wire: int) -> torch.dtype:
    """The torch dtype of a ``DType`` enum value. Raises InvalidArgument for unknown values."""
    try:
        return _WIRE_TO_TORCH[wire]
    except KeyError:
        raise InvalidArgument(
            f"unknown dtype code {wire}; expected one of {sorted(_WIRE_TO_TORCH)}"
        ) from None


def _le_bytes(tensor: torch.Tensor) -> torch.Tensor:
    """A flat uint8 view (or copy, on big-endian hosts) of the tensor's little-endian bytes."""
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    u8 = flat.view(torch.uint8)
    if _BIG_ENDIAN_HOST and flat.element_size() > 1:
        u8 = u8.view(-1, flat.element_size()).flip(1).reshape(-1)
    return u8


def to_wire(
    name: str, tensor: torch.Tensor, chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[pb.TensorChunk]:
    """Encodes one tensor as chunks of at most ``chunk_bytes`` bytes (at least one chunk)."""
    for chunk, _ in _sized_chunks(name, tensor, chunk_bytes):
        yield chunk


def _sized_chunks(
    name: str, tensor: torch.Tensor, chunk_bytes: int
) -> Iterator[tuple[pb.TensorChunk, int]]:
    """(chunk, its data length): reading ``chunk.data`` back would copy the bytes again."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    dtype = wire_dtype(tensor.dtype)
    shape = list(tensor.shape)
    u8 = _le_bytes(tensor).cpu()
    total = u8.numel()
    offset = 0
    while True:
        end = min(total, offset + chunk_bytes)
        yield pb.TensorChunk(
            name=name,
            dtype=dtype,
            shape=shape,
            offset_bytes=offset,
            data=u8[offset:end].numpy().tobytes(),
        ), end - offset
        offset = end
        if offset >= total:
            return


def pack(
    tensors: Iterable[tuple[str, torch.Tensor]], chunk_bytes: int = DEFAULT_CHUNK_BYTES
) -> Iterator[list[pb.TensorChunk]]:
    """Groups the chunks of several tensors into message-sized lists of at most ``chunk_bytes``
    data bytes each (small tensors share a message; big ones span several)."""
    batch: list[pb.TensorChunk] = []
    size = 0
    for name, tensor in tensors:
        for chunk, n in _sized_chunks(name, tensor, chunk_bytes):
            if batch and size + n > chunk_bytes:
                yield batch
                batch, size = [], 0
            batch.append(chunk)
            size += n
    if batch:
        yield batch


class _Partial:
    """One tensor being received. Its buffer is allocated at the first chunk, unless that chunk
    holds the whole tensor: then the tensor reads the received bytes in place (no copy)."""

    __slots__ = ("dtype", "shape", "tensor", "u8", "received", "total")

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape = shape
        self.tensor: torch.Tensor | None = None
        self.u8: torch.Tensor | None = None
        self.total = _numel(shape) * _ITEMSIZE[dtype]
        self.received = 0

    def take(self, data) -> None:
        """Takes the next chunk's bytes (checked by the caller to fit)."""
        n = len(data)
        if self.received == 0 and n == self.total and n and not _BIG_ENDIAN_HOST:
            t = torch.frombuffer(data, dtype=self.dtype)
            self.tensor = t if len(self.shape) == 1 else t.view(self.shape)
        else:
            if self.u8 is None:
                self.tensor = torch.empty(self.shape, dtype=self.dtype)
                flat = self.tensor.reshape(-1)
                self.u8 = (flat.view(torch.uint8) if self.dtype == torch.bool else flat).view(torch.uint8)
            if n:
                self.u8[self.received : self.received + n].copy_(torch.frombuffer(data, dtype=torch.uint8))
        self.received += n

    def result(self) -> torch.Tensor:
        if self.tensor is None:  # no bytes at all: an empty tensor
            self.tensor = torch.empty(self.shape, dtype=self.dtype)
        return self.tensor


class _EncodedPartial:
    """One tensor being received in a compressed encoding (``lepton.encodings``): its encoded
    bytes are gathered as ``_Partial`` gathers raw ones, then decoded by ``result``. A TOPK
    tensor's length is that of its one chunk (``total`` is set by the caller)."""

    __slots__ = ("name", "dtype", "shape", "encoding", "data", "buffer", "received", "total")

    def __init__(self, name: str, dtype: torch.dtype, shape: tuple[int, ...], encoding: int, total: int) -> None:
        self.name, self.dtype, self.shape, self.encoding = name, dtype, shape, encoding
        self.total = total
        self.received = 0
        self.data = None  # the one chunk that held it all (no copy)
        self.buffer: bytearray | None = None

    def take(self, data) -> None:
        n = len(data)
        if self.received == 0 and n == self.total:
            self.data = data
        else:
            if self.buffer is None:
                self.buffer = bytearray(self.total)
            self.buffer[self.received : self.received + n] = data
        self.received += n

    def result(self) -> torch.Tensor:
        data = self.data if self.data is not None else (self.buffer or b"")
        return encodings.decode(self.name, self.encoding, self.dtype, self.shape, data)


def _encoded_as(part: _Partial | _EncodedPartial) -> str:
    """" (FP16-encoded)" and the like for an encoded tensor, for messages; "" for a raw one."""
    return f" ({encodings.NAMES[part.encoding]}-encoded)" if isinstance(part, _EncodedPartial) else ""


_ITEMSIZE = {dtype: torch.empty((), dtype=dtype).element_size() for dtype in _TORCH_TO_WIRE}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class TensorAssembler:
    """Reassembles chunks into tensors, enforcing the chunk rules.

    With ``expected`` given, every tensor must be one of them with the same dtype and shape, and
    only trainable floating-point tensors expected whole (not sparse) may be encoded (see
    TensorEncoding in common.proto); ``finish`` decodes encoded ones to dense tensors.
    Raises InvalidArgument on the first broken rule (including an unexpected name).
    """

    def __init__(self, expected: Mapping[str, TensorSpec] | None = None) -> None:
        self._expected = expected
        self._parts: dict[str, _Partial | _EncodedPartial] = {}
        self.encoded_bytes: dict[str, int] = {}  # encoded tensors' data bytes as received, by name
        self._current: str | None = None
        self.bytes_received = 0

    def add(self, chunk: pb.TensorChunk) -> None:
        name = chunk.name
        dtype = torch_dtype(chunk.dtype)
        shape = tuple(chunk.shape)
        if not name:
            raise InvalidArgument("tensor chunk without a name")
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"tensor {name!r}: negative dimension in shape {list(shape)}")
        if self._expected is not None:
            spec = self._expected.get(name)
            if spec is None:
                raise InvalidArgument(f"tensor {name!r} is not held here; known: {sorted(self._expected)[:8]}")
            if spec.dtype != dtype:
                raise InvalidArgument(f"tensor {name!r}: dtype {dtype} but expected {spec.dtype}")
            if spec.shape != shape:
                raise InvalidArgument(
                    f"tensor {name!r}: shape {list(shape)} but expected {list(spec.shape)}"
                )
        encoding = chunk.encoding
        part = self._parts.get(name)
        data = chunk.data  # one copy out of a generated message; a view of a hand-decoded one
        if part is None:
            if self._current is not None and not self._complete(self._parts[self._current]):
                raise InvalidArgument(
                    f"tensor {name!r} started before tensor {self._current!r} was complete"
                )
            part = self._encoded(name, dtype, shape, encoding, chunk, data) if encoding else _Partial(dtype, shape)
            self._parts[name] = part
            self._current = name
        elif part.dtype != dtype or part.shape != shape:
            raise InvalidArgument(f"tensor {name!r}: dtype or shape changed between chunks")
        elif name != self._current:
            raise InvalidArgument(f"tensor {name!r} sent twice")
        elif encoding != getattr(part, "encoding", encodings.RAW):
            raise InvalidArgument(f"tensor {name!r}: encoding changed between chunks")
        elif encoding == encodings.TOPK:
            raise InvalidArgument(f"tensor {name!r}: a TOPK tensor travels as one chunk, at offset 0")
        total = part.total
        if chunk.offset_bytes != part.received:
            raise InvalidArgument(
                f"tensor {name!r}: chunk at byte offset {chunk.offset_bytes}, expected {part.received}"
            )
        if part.received + len(data) > total:
            raise InvalidArgument(
                f"tensor {name!r}: {part.received + len(data)} bytes for shape {list(shape)} x {dtype}"
                f"{_encoded_as(part)} which needs {total}"
            )
        part.take(data)
        self.bytes_received += len(data)
        if encoding:
            self.encoded_bytes[name] = part.received

    def _encoded(
        self, name: str, dtype: torch.dtype, shape: tuple[int, ...], encoding: int, chunk, data
    ) -> _EncodedPartial:
        """The partial of an encoded tensor's first chunk, once the encoding is allowed for it."""
        label = encodings.NAMES.get(encoding)
        if label is None:
            raise InvalidArgument(
                f"tensor {name!r}: unknown encoding {encoding}; this receiver decodes {sorted(encodings.NAMES)}"
            )
        spec = self._expected.get(name) if self._expected is not None else None
        if spec is not None and (not spec.trainable or spec.sparse or not dtype.is_floating_point):
            what = "pushed by rows" if spec.sparse else "not a trainable floating-point parameter"
            raise InvalidArgument(f"tensor {name!r} is {what}: send it raw, not {label}")
        n = _numel(shape)
        if n == 0:
            raise InvalidArgument(f"tensor {name!r} has no elements: send it raw, not {label}")
        total = encodings.fixed_length(encoding, n)
        if total is None:  # TOPK: one chunk
            if chunk.offset_bytes != 0:
                raise InvalidArgument(f"tensor {name!r}: a TOPK tensor travels as one chunk, at offset 0")
            total = len(data)
        return _EncodedPartial(name, dtype, shape, encoding, total)

    @staticmethod
    def _complete(part: _Partial | _EncodedPartial) -> bool:
        return part.received == part.total

    @property
    def received(self) -> tuple[int, int]:
        """(tensors begun, tensors complete) so far."""
        return len(self._parts), sum(1 for part in self._parts.values() if self._complete(part))

    def finish(self, require: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """Returns the tensors; raises InvalidArgument if any is short or a required one missing."""
        for name, part in self._parts.items():
            if not self._complete(part):
                raise InvalidArgument(
                    f"tensor {name!r}: received {part.received} of {part.total}{_encoded_as(part)} bytes"
                )
        if require is not None:
            missing = sorted(set(require) - set(self._parts))
            if missing:
                raise InvalidArgument(f"tensors missing: {missing[:8]}")
        out: dict[str, torch.Tensor] = {}
        for name, part in self._parts.items():
            t = part.result()
            if isinstance(part, _EncodedPartial):  # decoded in host order
                out[name] = t
                continue
            if _BIG_ENDIAN_HOST and t.element_size() > 1:
                t = _le_bytes(t).view(t.dtype).reshape(part.shape)
            out[name] = t
        return out


def from_wire(chunks: Iterable[pb.TensorChunk]) -> dict[str, torch.Tensor]:
    """Decodes a complete sequence of chunks into named tensors."""
    assembler = TensorAssembler()
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.finish()


# --- row-sparse tensors (RowSelection on the wire) --------------------------------------------


def sparse_to_rows(grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row indices, their rows) of a sparse COO tensor whose sparse dimension is dimension 0 (what
    ``nn.Embedding(sparse=True)`` produces): duplicates summed, rows in increasing order."""
    if grad.sparse_dim() != 1:
        raise InvalidArgument(f"a row-sparse tensor has one sparse dimension, this one {grad.sparse_dim()}")
    grad = grad.coalesce()
    return grad.indices()[0], grad.values()


def rows_to_sparse(spec: TensorSpec, rows: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The sparse COO tensor of ``spec``'s shape holding ``values`` at ``rows`` (checked)."""
    if not spec.shape:
        raise InvalidArgument(f"tensor {spec.name!r} has no rows (0-dim)")
    # Lepton's clients send coalesced gradients (rows strictly increasing): then the range check is
    # enough and the tensor is coalesced already; any other order gets the full check.
    increasing = rows.numel() < 2 or bool((rows[1:] > rows[:-1]).all())
    check_rows(spec.name, rows, spec.shape[0], distinct=increasing)
    # rows were checked above (distinct, in range); values come from the assembler with their shape
    return torch.sparse_coo_tensor(
        rows.reshape(1, -1), values, spec.shape, is_coalesced=increasing, check_invariants=False
    )
