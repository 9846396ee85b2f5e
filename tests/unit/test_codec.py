"""The tensor codec: bit-exact round trips, chunking and the assembler's rules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton import codec
from lepton.errors import InvalidArgument
from lepton.tensors import TensorSpec
from lepton.v1 import common_pb2 as pb

pytestmark = pytest.mark.filterwarnings("ignore:The given buffer is not writable")

ALL_DTYPES = sorted(codec._TORCH_TO_WIRE, key=str)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's bytes, so NaN payloads and -0.0 are compared exactly."""
    flat = t.contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    return flat.view(torch.uint8).numpy().tobytes()


def sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random values spanning the dtype's range; floats include NaN, +-Inf and -0.0."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point:
        t = (torch.randn(shape, generator=g, dtype=torch.float64) * 1e3).to(dtype)
        flat = t.reshape(-1)
        for i, special in enumerate([float("nan"), float("inf"), float("-inf"), -0.0]):
            if i < flat.numel():
                flat[i] = special
        return t
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    t = torch.randint(low, high, shape, generator=g, dtype=torch.int64).to(dtype)
    flat = t.reshape(-1)
    if flat.numel() >= 2:
        flat[0], flat[1] = info.min, info.max
    return t


def round_trip(name: str, t: torch.Tensor, chunk_bytes: int = codec.DEFAULT_CHUNK_BYTES) -> torch.Tensor:
    out = codec.from_wire(codec.to_wire(name, t, chunk_bytes))
    assert list(out) == [name]
    return out[name]


def chunk(name="w", dtype=pb.DTYPE_FLOAT32, shape=(4,), offset=0, data=b"") -> pb.TensorChunk:
    return pb.TensorChunk(name=name, dtype=dtype, shape=list(shape), offset_bytes=offset, data=data)


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_every_wire_dtype_round_trips_bit_exact(dtype):
    t = sample(dtype, (3, 5), seed=1)
    out = round_trip("p", t)
    assert out.dtype == dtype
    assert out.shape == t.shape
    assert raw_bytes(out) == raw_bytes(t)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_zero_dim_scalars_round_trip_with_an_empty_shape(dtype):
    t = sample(dtype, (), seed=2)
    chunks = list(codec.to_wire("s", t))
    assert len(chunks) == 1 and list(chunks[0].shape) == []
    out = round_trip("s", t)
    assert out.shape == torch.Size([]) and out.dtype == dtype
    assert raw_bytes(out) == raw_bytes(t)


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bool, torch.int64])
def test_empty_tensors_travel_as_one_empty_chunk(dtype, shape):
    t = torch.empty(shape, dtype=dtype)
    chunks = list(codec.to_wire("e", t, chunk_bytes=4))
    assert len(chunks) == 1 and chunks[0].data == b"" and list(chunks[0].shape) == list(shape)
    out = round_trip("e", t)
    assert out.shape == torch.Size(shape) and out.dtype == dtype


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_non_contiguous_inputs_round_trip_as_their_logical_values(dtype):
    base = sample(dtype, (4, 6), seed=3)
    for view in (base.t(), base[:, ::2], base[1:3, 1:5].t()):
        assert not view.is_contiguous()
        out = round_trip("v", view, chunk_bytes=5)
        assert out.shape == view.shape
        assert raw_bytes(out) == raw_bytes(view.contiguous())


def test_bfloat16_bytes_on_the_wire_are_little_endian_upper_half_of_binary32():
    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    (c,) = codec.to_wire("b", t)
    assert c.dtype == pb.DTYPE_BFLOAT16
    # 1.0f = 0x3F800000 -> bf16 0x3F80 -> LE 80 3F; -2.0f = 0xC0000000 -> C000 -> 00 C0
    assert c.data == bytes([0x80, 0x3F, 0x00, 0xC0])


def test_bool_travels_as_one_byte_zero_or_one():
    (c,) = codec.to_wire("m", torch.tensor([True, False, True]))
    assert c.dtype == pb.DTYPE_BOOL and c.data == b"\x01\x00\x01"


def test_int32_is_encoded_little_endian():
    (c,) = codec.to_wire("i", torch.tensor([1, -2], dtype=torch.int32))
    assert c.data == b"\x01\x00\x00\x00\xfe\xff\xff\xff"


def test_decoded_tensors_are_writable_and_independent_of_the_messages():
    t = torch.arange(6, dtype=torch.float32)
    chunks = list(codec.to_wire("w", t, chunk_bytes=8))
    out = codec.from_wire(chunks)["w"]
    out.add_(1)  # must not raise: the buffer is ours, not the message's
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    assert codec.from_wire(chunks)["w"].tolist() == t.tolist()


def test_unsupported_dtype_cannot_be_encoded():
    with pytest.raises(InvalidArgument):
        list(codec.to_wire("c", torch.zeros(2, dtype=torch.complex64)))


# --- chunking ----------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_bytes", [1, 3, 7, 16, 40, 1000])
def test_small_chunks_reassemble_bit_exact(chunk_bytes):
    t = sample(torch.float64, (5, 5), seed=4)  # 200 bytes
    chunks = list(codec.to_wire("c", t, chunk_bytes))
    assert len(chunks) == math.ceil(200 / chunk_bytes)
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    assert [c.offset_bytes for c in chunks] == list(range(0, 200, chunk_bytes))
    assert all(list(c.shape) == [5, 5] and c.name == "c" for c in chunks)
    assert raw_bytes(codec.from_wire(chunks)["c"]) == raw_bytes(t)


def test_pack_keeps_each_message_within_chunk_bytes_and_round_trips():
    tensors = [
        ("a", sample(torch.float32, (3,), seed=5)),  # 12 bytes
        ("b", sample(torch.int8, (2,), seed=6)),  # 2 bytes
        ("c", sample(torch.float64, (9,), seed=7)),  # 72 bytes
        ("d", torch.empty(0)),
        ("e", sample(torch.bool, (5,), seed=8)),  # 5 bytes
    ]
    chunk_bytes = 16
    messages = list(codec.pack(tensors, chunk_bytes))
    assert all(sum(len(c.data) for c in m) <= chunk_bytes for m in messages)
    assert all(m for m in messages)
    flat = [c for m in messages for c in m]
    assert len(messages) < len(flat)  # small tensors share a message
    out = codec.from_wire(flat)
    assert list(out) == [n for n, _ in tensors]
    for name, t in tensors:
        assert raw_bytes(out[name]) == raw_bytes(t)


def test_pack_of_nothing_yields_no_messages():
    assert list(codec.pack([], 16)) == []


# --- the assembler's rules ---------------------------------------------------------------------


def four_floats() -> bytes:
    return torch.arange(4, dtype=torch.float32).numpy().tobytes()  # 16 bytes


def test_assembler_accepts_chunks_in_offset_order_and_counts_bytes():
    data = four_floats()
    a = codec.TensorAssembler()
    a.add(chunk(data=data[:6]))
    a.add(chunk(offset=6, data=data[6:]))
    assert a.bytes_received == 16
    assert a.finish()["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize("second_offset", [0, 4, 8, 10], ids=lambda o: f"offset{o}")
def test_assembler_rejects_a_chunk_not_at_the_next_offset(second_offset):
    data = four_floats()
    a = codec.TensorAssembler()
    a.add(chunk(data=data[:6]))
    with pytest.raises(InvalidArgument, match="offset"):
        a.add(chunk(offset=second_offset, data=data[6:10]))


def test_assembler_rejects_a_first_chunk_that_does_not_start_at_zero():
    with pytest.raises(InvalidArgument):
        codec.TensorAssembler().add(chunk(offset=4, data=four_floats()[4:]))


def test_assembler_rejects_more_bytes_than_the_shape_needs():
    a = codec.TensorAssembler()
    with pytest.raises(InvalidArgument, match="needs 16"):
        a.add(chunk(data=four_floats() + b"\x00"))
    a2 = codec.TensorAssembler()
    a2.add(chunk(data=four_floats()))
    with pytest.raises(InvalidArgument):
        a2.add(chunk(offset=16, data=b"\x00"))


def test_assembler_rejects_bytes_for_an_empty_tensor():
    with pytest.raises(InvalidArgument):
        codec.TensorAssembler().add(chunk(shape=(0,), data=b"\x00"))


def test_finish_rejects_a_short_tensor():
    a = codec.TensorAssembler()
    a.add(chunk(data=four_floats()[:12]))
    with pytest.raises(InvalidArgument, match="received 12 of 16"):
        a.finish()


def test_assembler_rejects_a_tensor_started_before_the_previous_one_is_complete():
    a = codec.TensorAssembler()
    a.add(chunk(name="w", data=four_floats()[:8]))
    with pytest.raises(InvalidArgument, match="before tensor 'w' was complete"):
        a.add(chunk(name="v", data=four_floats()))


def test_assembler_rejects_a_tensor_sent_again_after_another():
    a = codec.TensorAssembler()
    a.add(chunk(name="w", data=four_floats()))
    a.add(chunk(name="v", data=four_floats()))
    with pytest.raises(InvalidArgument, match="sent twice"):
        a.add(chunk(name="w", offset=16, data=b""))


def test_assembler_rejects_a_dtype_change_between_chunks():
    a = codec.TensorAssembler()
    a.add(chunk(data=four_floats()[:8]))
    with pytest.raises(InvalidArgument, match="changed between chunks"):
        a.add(chunk(dtype=pb.DTYPE_INT32, offset=8, data=four_floats()[8:]))


def test_assembler_rejects_a_shape_change_between_chunks():
    a = codec.TensorAssembler()
    a.add(chunk(data=four_floats()[:8]))
    with pytest.raises(InvalidArgument, match="changed between chunks"):
        a.add(chunk(shape=(2, 2), offset=8, data=four_floats()[8:]))


@pytest.mark.parametrize("code", [pb.DTYPE_UNSPECIFIED, 11, 999])
def test_assembler_rejects_an_unknown_dtype_code(code):
    with pytest.raises(InvalidArgument, match="unknown dtype code"):
        codec.TensorAssembler().add(chunk(dtype=code, data=b""))


def test_assembler_rejects_a_chunk_without_a_name():
    with pytest.raises(InvalidArgument, match="without a name"):
        codec.TensorAssembler().add(chunk(name="", data=four_floats()))


def test_assembler_rejects_a_negative_dimension():
    with pytest.raises(InvalidArgument, match="negative"):
        codec.TensorAssembler().add(chunk(shape=(2, -2), data=b""))


EXPECTED = {"w": TensorSpec("w", torch.float32, (4,))}


def test_assembler_with_expected_accepts_a_matching_tensor():
    a = codec.TensorAssembler(EXPECTED)
    a.add(chunk(data=four_floats()))
    assert a.finish(require=EXPECTED)["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


def test_assembler_with_expected_rejects_an_unexpected_name():
    with pytest.raises(InvalidArgument, match="not held here"):
        codec.TensorAssembler(EXPECTED).add(chunk(name="x", data=four_floats()))


def test_assembler_with_expected_rejects_an_unexpected_dtype():
    with pytest.raises(InvalidArgument, match="dtype"):
        codec.TensorAssembler(EXPECTED).add(chunk(dtype=pb.DTYPE_INT32, data=four_floats()))


def test_assembler_with_expected_rejects_an_unexpected_shape():
    with pytest.raises(InvalidArgument, match="shape"):
        codec.TensorAssembler(EXPECTED).add(chunk(shape=(2, 2), data=four_floats()))


def test_finish_rejects_a_missing_required_tensor():
    a = codec.TensorAssembler()
    a.add(chunk(name="w", data=four_floats()))
    with pytest.raises(InvalidArgument, match=r"missing: \['v'\]"):
        a.finish(require=["w", "v"])


def test_finish_without_requirements_accepts_nothing_received():
    assert codec.TensorAssembler().finish() == {}


# --- properties --------------------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    dtype=st.sampled_from(ALL_DTYPES),
    shape=st.lists(st.integers(0, 5), max_size=4).map(tuple),
    chunk_bytes=st.integers(1, 64),
    seed=st.integers(0, 2**31 - 1),
    transpose=st.booleans(),
)
def test_any_tensor_round_trips_bit_exact_through_any_chunk_size(dtype, shape, chunk_bytes, seed, transpose):
    t = sample(dtype, shape, seed)
    if transpose and t.dim() >= 2:
        t = t.transpose(0, 1)
    chunks = list(codec.to_wire("p", t, chunk_bytes))
    size = t.numel() * t.element_size()
    assert sum(len(c.data) for c in chunks) == size
    assert all(len(c.data) <= chunk_bytes for c in chunks)
    out = codec.from_wire(chunks)["p"]
    assert out.dtype == dtype and out.shape == t.shape
    assert raw_bytes(out) == raw_bytes(t)
