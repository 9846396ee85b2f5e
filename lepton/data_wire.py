"""A hand-written protobuf codec of the data plane's hot messages (PushRequest, PullResponse).

The generated classes copy every ``bytes`` field twice or more (into the message, out of it); here
a message's chunks are encoded straight from tensor memory (one copy: the join into the message's
bytes) and decoded as ``memoryview`` slices of the received bytes (no copy: ``torch.frombuffer``
reads them). The bytes are exactly what the generated classes produce and accept
(``tests/unit/test_data_wire.py`` proves it both ways).

Decoding takes the fast path only for what it fully understands: the fields of the .proto in any
order, repeated scalars (last one wins, as protobuf does), packed or unpacked shapes. Anything
else (an unknown field, a group, a repeated sub-message, a bad varint, a length past the end,
invalid UTF-8) is handed to the generated class, which either parses it (unknown fields are
skipped) or raises, exactly as before: a malformed message is rejected with the same error.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator

import torch

from lepton.encodings import TOPK, Encoded
from lepton.v1 import parameter_server_pb2 as ppb

_BIG_ENDIAN_HOST = sys.byteorder == "big"
_U64 = 1 << 64


class _Fallback(Exception):
    """The fast decoder does not handle this message: the generated class decides."""


class Chunk:
    """A decoded TensorChunk whose ``data`` is a memoryview into the received message."""

    __slots__ = ("name", "dtype", "shape", "offset_bytes", "data", "encoding")

    def __init__(self) -> None:
        self.name = ""
        self.dtype = 0
        self.shape: list[int] = []
        self.offset_bytes = 0
        self.data: memoryview | bytes = b""
        self.encoding = 0


class PushMessage:
    """A decoded PushRequest: ``header`` (a generated PushHeader, or None) and ``chunks``. It has
    the generated class's ``DESCRIPTOR``, ``HasField`` and ``ByteSize`` (the bytes it was decoded
    from), so code that inspects requests (the identity check of ``lepton.security``) sees it as
    a PushRequest."""

    __slots__ = ("header", "chunks", "_size")
    DESCRIPTOR = ppb.PushRequest.DESCRIPTOR

    def __init__(self, header: ppb.PushHeader | None, chunks: list[Chunk], size: int = 0) -> None:
        self.header = header
        self.chunks = chunks
        self._size = size

    def ByteSize(self) -> int:  # noqa: N802
        return self._size

    def HasField(self, name: str) -> bool:  # noqa: N802 - the generated classes' spelling
        if name != "header":
            raise ValueError(f"PushRequest has no singular message field {name!r}")
        return self.header is not None


class PullMessage:
    """A decoded PullResponse: ``version``, ``chunks`` and ``push`` (a generated PushResponse, or
    None); ``DESCRIPTOR``, ``HasField`` and ``ByteSize`` as PushMessage."""

    __slots__ = ("version", "chunks", "push", "_size")
    DESCRIPTOR = ppb.PullResponse.DESCRIPTOR

    def __init__(self, version: int, chunks: list[Chunk], push: ppb.PushResponse | None, size: int = 0) -> None:
        self.version = version
        self.chunks = chunks
        self.push = push
        self._size = size

    def ByteSize(self) -> int:  # noqa: N802
        return self._size

    def HasField(self, name: str) -> bool:  # noqa: N802
        if name != "push":
            raise ValueError(f"PullResponse has no singular message field {name!r}")
        return self.push is not None


# --- decoding ----------------------------------------------------------------------------------


def _varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    result = 0
    shift = 0
    while True:
        if pos >= end:
            raise _Fallback
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            if result >= _U64:
                raise _Fallback
            return result, pos
        shift += 7
        if shift >= 70:
            raise _Fallback


def _int64(v: int) -> int:
    return v - _U64 if v >= 1 << 63 else v


def _int32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


def _length(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    n, pos = _varint(buf, pos, end)
    if pos + n > end:
        raise _Fallback
    return pos, pos + n


def _chunk(buf: bytes, view: memoryview, pos: int, end: int) -> Chunk:
    chunk = Chunk()
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 2:
            start, pos = _length(buf, pos, end)
            if field == 5:
                chunk.data = view[start:pos]
            elif field == 1:
                try:
                    chunk.name = buf[start:pos].decode("utf-8")
                except UnicodeDecodeError:
                    raise _Fallback from None
            elif field == 3:  # packed shape
                while start < pos:
                    v, start = _varint(buf, start, pos)
                    chunk.shape.append(_int64(v))
            else:
                raise _Fallback
        elif wire == 0:
            v, pos = _varint(buf, pos, end)
            if field == 2:
                chunk.dtype = _int32(v)
            elif field == 4:
                chunk.offset_bytes = _int64(v)
            elif field == 6:  # an enum: int32, as the generated class reads it
                chunk.encoding = _int32(v)
            elif field == 3:  # an unpacked shape element
                chunk.shape.append(_int64(v))
            else:
                raise _Fallback
        else:
            raise _Fallback
    return chunk


def _decode_push(data: bytes) -> PushMessage:
    buf = bytes(data)
    view = memoryview(buf)
    end = len(buf)
    pos = 0
    header = None
    chunks: list[Chunk] = []
    while pos < end:
        key, pos = _varint(buf, pos, end)
        if key & 7 != 2:
            raise _Fallback
        start, pos = _length(buf, pos, end)
        field = key >> 3
        if field == 2:
            chunks.append(_chunk(buf, view, start, pos))
        elif field == 1 and header is None:  # a repeated header is merged by protobuf: let it
            try:
                header = ppb.PushHeader.FromString(buf[start:pos])
            except Exception:  # noqa: BLE001 - the generated class raises the same for the whole message
                raise _Fallback from None
        else:
            raise _Fallback
    return PushMessage(header, chunks, end)


def decode_push(data: bytes) -> PushMessage | ppb.PushRequest:
    """A PushRequest's bytes decoded (a PushMessage, or the generated message for what the fast
    path leaves to it). Raises what ``PushRequest.FromString`` raises for malformed bytes."""
    try:
        return _decode_push(data)
    except _Fallback:
        return ppb.PushRequest.FromString(data)


def _decode_pull(data: bytes) -> PullMessage:
    buf = bytes(data)
    view = memoryview(buf)
    end = len(buf)
    pos = 0
    version = 0
    push = None
    chunks: list[Chunk] = []
    while pos < end:
        key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if field == 1 and wire == 0:
            v, pos = _varint(buf, pos, end)
            version = _int64(v)
            continue
        if wire != 2:
            raise _Fallback
        start, pos = _length(buf, pos, end)
        if field == 2:
            chunks.append(_chunk(buf, view, start, pos))
        elif field == 3 and push is None:
            try:
                push = ppb.PushResponse.FromString(buf[start:pos])
            except Exception:  # noqa: BLE001
                raise _Fallback from None
        else:
            raise _Fallback
    return PullMessage(version, chunks, push, end)


def decode_pull(data: bytes) -> PullMessage | ppb.PullResponse:
    """A PullResponse's bytes decoded (see ``decode_push``)."""
    try:
        return _decode_pull(data)
    except _Fallback:
        return ppb.PullResponse.FromString(data)


# --- encoding ----------------------------------------------------------------------------------


def _varint_bytes(v: int) -> bytes:
    if 0 <= v < 0x80:
        return _SMALL[v]
    if v < 0:
        v += _U64
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


_SMALL = [bytes([i]) for i in range(0x80)]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The tensor's little-endian row-major bytes as a flat memoryview: its own memory when it is
    contiguous and in CPU memory (no copy), else a contiguous copy."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous():
        t = t.contiguous()
    if _BIG_ENDIAN_HOST and t.element_size() > 1:
        t = t.reshape(-1).view(torch.uint8).view(-1, t.element_size()).flip(1).contiguous()
    elif t.dtype in _NO_NUMPY:
        t = t.view(_NO_NUMPY[t.dtype])
    # an ndarray has the buffer protocol; numpy's stubs declare __buffer__ for Python 3.12+ only
    return memoryview(t.numpy().reshape(-1)).cast("B")  # type: ignore[arg-type]


_NO_NUMPY = {torch.bfloat16: torch.int16}  # dtypes numpy lacks: their bytes as an integer of that width
_PREFIXES: dict[tuple[str, torch.dtype, tuple[int, ...]], bytes] = {}


def _prefix(name: str, dtype: torch.dtype, shape: tuple[int, ...]) -> bytes:
    """A TensorChunk's name, dtype and shape fields (remembered: the same tensors travel every step)."""
    key = (name, dtype, shape)
    prefix = _PREFIXES.get(key)
    if prefix is None:
        from lepton.codec import wire_dtype  # codec imports this module

        name_b = name.encode("utf-8")
        parts = [b"\x0a", _varint_bytes(len(name_b)), name_b, b"\x10", _varint_bytes(wire_dtype(dtype))]
        if shape:
            packed = b"".join(_varint_bytes(d) for d in shape)
            parts += [b"\x1a", _varint_bytes(len(packed)), packed]
        prefix = b"".join(parts)
        if len(_PREFIXES) >= 65536:
            _PREFIXES.clear()
        _PREFIXES[key] = prefix
    return prefix


def nbytes(tensor: torch.Tensor | Encoded) -> int:
    """The data bytes a tensor (raw, or encoded: ``lepton.encodings.Encoded``) puts on the wire."""
    if isinstance(tensor, Encoded):
        return tensor.nbytes
    return tensor.numel() * tensor.element_size()


class _TensorHead:
    """A tensor's bytes and the bytes of its chunks before their data (and after it: the
    encoding, field 6, of an encoded tensor). ``whole``: its data must travel as one chunk."""

    __slots__ = ("prefix", "total", "data", "suffix", "whole")

    def __init__(self, name: str, tensor: torch.Tensor | Encoded) -> None:
        if isinstance(tensor, Encoded):
            self.prefix = _prefix(name, tensor.dtype, tensor.shape)
            self.data = tensor_bytes(tensor.payload)
            self.suffix = b"\x30" + _varint_bytes(tensor.encoding)
            self.whole = tensor.encoding == TOPK
        else:
            self.prefix = _prefix(name, tensor.dtype, tuple(tensor.shape))
            self.data = tensor_bytes(tensor)
            self.suffix = b""
            self.whole = False
        self.total = len(self.data)

    def chunk(self, offset: int, end: int) -> list:
        """The parts of the message field ``chunks`` (field 2) holding bytes [offset, end)."""
        n = end - offset
        if not offset and n and not self.suffix:  # the common case: a whole tensor, or the first chunk of one
            tail = b"\x2a" + _varint_bytes(n)
            return [b"\x12", _varint_bytes(len(self.prefix) + len(tail) + n), self.prefix, tail, self.data[:end]]
        body = [self.prefix]
        if offset:
            body += [b"\x20", _varint_bytes(offset)]
        if n:
            body += [b"\x2a", _varint_bytes(n)]
        size = sum(len(p) for p in body) + n + len(self.suffix)
        parts: list[bytes | memoryview] = [b"\x12", _varint_bytes(size), *body]
        if n:
            parts.append(self.data[offset:end])
        if self.suffix:
            parts.append(self.suffix)
        return parts


def _messages(
    tensors: Iterable[tuple[str, torch.Tensor | Encoded]], chunk_bytes: int, first_prefix: bytes, prefix: bytes,
    first_suffix: bytes = b"",
) -> Iterator[bytes]:
    """Message bytes: ``first_prefix`` / ``prefix`` then the chunks of ``tensors`` grouped as
    ``lepton.codec.pack`` groups them (then ``first_suffix`` in the first message)."""
    if chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
    batch: list = []
    size = 0
    first = True

    def emit() -> bytes:
        nonlocal first
        head = first_prefix if first else prefix
        out = b"".join([head, *batch, first_suffix if first else b""])
        first = False
        return out

    for name, tensor in tensors:
        head = _TensorHead(name, tensor)
        offset = 0
        while True:
            end = head.total if head.whole else min(head.total, offset + chunk_bytes)
            n = end - offset
            if batch and size + n > chunk_bytes:
                yield emit()
                batch, size = [], 0
            batch += head.chunk(offset, end)
            size += n
            offset = end
            if offset >= head.total:
                break
    if batch or first:
        yield emit()


def encode_push(
    header: ppb.PushHeader, tensors: Iterable[tuple[str, torch.Tensor | Encoded]], chunk_bytes: int
) -> Iterator[bytes]:
    """The PushRequest messages of a push: the header in the first, chunks of at most
    ``chunk_bytes`` data bytes each (at least one message). An encoded tensor's chunks carry its
    encoded bytes; a TOPK one travels as one chunk whatever its size (common.proto)."""
    h = header.SerializeToString()
    return _messages(tensors, chunk_bytes, b"\x0a" + _varint_bytes(len(h)) + h, b"")


def encode_pull(
    version: int,
    tensors: Iterable[tuple[str, torch.Tensor]],
    chunk_bytes: int,
    push: ppb.PushResponse | None = None,
) -> list[bytes]:
    """The PullResponse messages of ``tensors`` at ``version`` (the push outcome in the first).
    Every byte of tensor data is copied once, into the messages: the result owns no tensor."""
    v = b"\x08" + _varint_bytes(version) if version else b""
    suffix = b""
    if push is not None:
        p = push.SerializeToString()
        suffix = b"\x1a" + _varint_bytes(len(p)) + p
    return list(_messages(tensors, chunk_bytes, v, v, suffix))


def encoded_size(messages: Iterable[bytes]) -> int:
    return sum(len(m) for m in messages)

