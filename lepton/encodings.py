"""Compressed encodings of a gradient on the wire (``TensorEncoding`` in common.proto): what a
worker sends for a tensor, and what a receiver decodes it to. Pure torch; error feedback, the
worker's half, is in ``worker/compression.py``.

Layouts (little-endian, n = the tensor's element count, row-major):
- FP16 / BF16: n values of that type (2n bytes);
- TOPK: k int32 flat indices, then the k values in the tensor's dtype;
- SIGN: a float32 scale s, then ceil(n / 8) bytes of sign bits, LSB first (1: +s, 0: -s).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import torch

from lepton.errors import InvalidArgument
from lepton.v1 import common_pb2 as pb

RAW: int = pb.TENSOR_ENCODING_UNSPECIFIED
FP16: int = pb.TENSOR_ENCODING_FP16
BF16: int = pb.TENSOR_ENCODING_BF16
TOPK: int = pb.TENSOR_ENCODING_TOPK
SIGN: int = pb.TENSOR_ENCODING_SIGN
NAMES: dict[int, str] = {FP16: "FP16", BF16: "BF16", TOPK: "TOPK", SIGN: "SIGN"}
# JobSpec.gradient_compression -> the encoding its pushes use
BY_COMPRESSION: dict[str, int] = {"fp16": FP16, "bf16": BF16, "topk": TOPK, "sign": SIGN}
MAX_TOPK_ELEMENTS = (1 << 31) - 1  # int32 indices
_HALF: dict[int, torch.dtype] = {FP16: torch.float16, BF16: torch.bfloat16}
_FP16_MAX = torch.finfo(torch.float16).max
_BIG_ENDIAN_HOST = sys.byteorder == "big"


@dataclass(frozen=True)
class Encoded:
    """A tensor's encoded bytes as they travel: ``payload`` (flat uint8, CPU, contiguous) encodes
    a tensor of ``dtype`` and ``shape`` (the parameter's own) by ``encoding``."""

    encoding: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    payload: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.payload.numel()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _le_u8(t: torch.Tensor) -> torch.Tensor:
    """A flat CPU uint8 tensor of ``t``'s little-endian bytes."""
    t = t.detach().reshape(-1).cpu().contiguous()
    u8 = t.view(torch.uint8)
    if _BIG_ENDIAN_HOST and t.element_size() > 1:
        u8 = u8.view(-1, t.element_size()).flip(1).reshape(-1)
    return u8


def _from_le(data, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of ``dtype`` read from little-endian bytes (a read-only view where it can)."""
    if not len(data):
        return torch.empty(0, dtype=dtype)
    u8 = torch.frombuffer(data, dtype=torch.uint8)
    size = _itemsize(dtype)
    if _BIG_ENDIAN_HOST and size > 1:
        u8 = u8.view(-1, size).flip(1).reshape(-1).contiguous()
    return u8.view(dtype)


def encode(tensor: torch.Tensor, encoding: int, topk_ratio: float = 0.01) -> tuple[Encoded, torch.Tensor]:
    """``tensor`` (dense, floating point, at least one element) encoded, and the tensor the
    receiver will decode (same dtype, shape and device as ``tensor``): their difference is the
    error the encoding made."""
    t = tensor.detach()
    shape = tuple(t.shape)
    flat = t.reshape(-1)
    n = flat.numel()
    if n == 0 or not t.is_floating_point():
        raise ValueError(f"only non-empty floating-point tensors are encoded, not {t.dtype} of shape {list(shape)}")
    if encoding in _HALF:
        src = flat.clamp(-_FP16_MAX, _FP16_MAX) if encoding == FP16 else flat
        half = src.to(_HALF[encoding])
        return Encoded(encoding, t.dtype, shape, _le_u8(half)), half.to(t.dtype).view(shape)
    if encoding == TOPK:
        if n > MAX_TOPK_ELEMENTS:
            raise ValueError(f"TOPK encodes tensors of fewer than 2^31 elements, not {n}")
        k = topk_count(n, topk_ratio)
        idx = _largest(flat.abs(), k)
        values = flat[idx]
        payload = torch.cat([_le_u8(idx.to(torch.int32)), _le_u8(values)])
        sent = torch.zeros_like(flat).index_copy_(0, idx, values)
        return Encoded(TOPK, t.dtype, shape, payload), sent.view(shape)
    if encoding == SIGN:
        scale = flat.abs().mean().to(torch.float32)
        positive = flat >= 0
        packed = torch.from_numpy(np.packbits(positive.cpu().numpy(), bitorder="little"))
        payload = torch.cat([_le_u8(scale.reshape(1)), packed])
        s = scale.to(t.dtype)
        sent = positive.to(t.dtype).mul_(2 * s).sub_(s)  # +s where positive, else -s
        return Encoded(SIGN, t.dtype, shape, payload), sent.view(shape)
    raise ValueError(f"unknown encoding {encoding}")


def topk_count(n: int, topk_ratio: float) -> int:
    """How many of ``n`` elements TOPK sends: max(1, round(topk_ratio x n)), at most n."""
    return min(n, max(1, round(topk_ratio * n)))


def topk_bytes(n: int, dtype: torch.dtype, topk_ratio: float) -> int:
    """The TOPK encoded length of ``n`` elements of ``dtype``."""
    return topk_count(n, topk_ratio) * (4 + _itemsize(dtype))


def _largest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64, any order) of ``k`` largest elements of a flat tensor: numpy's partition
    on the CPU (several times quicker than ``torch.topk`` there), ``torch.topk`` elsewhere."""
    n = magnitudes.numel()
    if magnitudes.device.type != "cpu" or magnitudes.dtype == torch.bfloat16:
        return magnitudes.topk(k, sorted=False).indices
    return torch.from_numpy(np.argpartition(magnitudes.numpy(), n - k)[n - k :].astype(np.int64))


def fixed_length(encoding: int, n: int) -> int | None:
    """The encoded byte length of ``n`` elements, or None where it depends on the data (TOPK).
    Raises InvalidArgument for an unknown encoding."""
    if encoding in _HALF:
        return 2 * n
    if encoding == SIGN:
        return 4 + (n + 7) // 8
    if encoding == TOPK:
        return None
    raise InvalidArgument(f"unknown tensor encoding {encoding}; this server decodes {sorted(NAMES)}")


def decode(name: str, encoding: int, dtype: torch.dtype, shape: tuple[int, ...], data) -> torch.Tensor:
    """The dense tensor of ``dtype`` and ``shape`` that encoded ``data`` (bytes-like) stands for.
    Raises InvalidArgument, saying what is wrong, for data that does not decode."""
    n = _numel(shape)
    what = f"tensor {name!r} ({NAMES.get(encoding, encoding)})"
    expected = fixed_length(encoding, n)
    if expected is not None and len(data) != expected:
        raise InvalidArgument(f"{what}: {len(data)} encoded bytes, but {n} elements need {expected}")
    if encoding in _HALF:
        return _from_le(data, _HALF[encoding]).to(dtype).view(shape)
    if encoding == SIGN:
        scale = float(_from_le(data[:4], torch.float32)[0])
        if not (scale >= 0 and scale < float("inf")):
            raise InvalidArgument(f"{what}: the scale must be finite and >= 0, got {scale}")
        bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8, offset=4), bitorder="little")
        if bits[n:].any():
            raise InvalidArgument(f"{what}: the unused bits of the last byte must be 0")
        s = torch.tensor(scale, dtype=dtype)
        return torch.from_numpy(bits[:n]).to(dtype).mul_(2 * s).sub_(s).view(shape)
    # TOPK
    size = 4 + _itemsize(dtype)
    if len(data) % size:
        raise InvalidArgument(f"{what}: {len(data)} encoded bytes is not a whole number of {size}-byte entries")
    k = len(data) // size
    if k > n:
        raise InvalidArgument(f"{what}: {k} entries for {n} elements")
    out = torch.zeros(n, dtype=dtype)
    if k:
        idx = _from_le(data[: 4 * k], torch.int32).to(torch.int64)
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= n:
            raise InvalidArgument(f"{what}: index {low if low < 0 else high} outside [0, {n})")
        if torch.unique(idx).numel() != k:
            raise InvalidArgument(f"{what}: an index appears more than once")
        out.index_copy_(0, idx, _from_le(data[4 * k :], dtype))
    return out.view(shape)
