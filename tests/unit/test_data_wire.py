"""The hand codec of the data plane (lepton.data_wire) against the generated protobuf classes: the
bytes it writes are the bytes they write, it reads what they write (in any field order, with
unknown fields, packed or not), and what it cannot read it hands to them, so malformed bytes fail
exactly as before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from lepton import codec, data_wire
from lepton.v1 import common_pb2 as common
from lepton.v1 import parameter_server_pb2 as ppb

TENSORS = [
    ("w", torch.arange(12, dtype=torch.float32).reshape(3, 4)),
    ("scalar", torch.tensor(2.5, dtype=torch.float64)),
    ("empty", torch.zeros(0, 3)),
    ("steps", torch.tensor([7, -1], dtype=torch.int64)),
    ("mask", torch.tensor([True, False, True])),
    ("half", torch.randn(5, dtype=torch.float16)),
    ("ünï", torch.randn(2, 2, dtype=torch.bfloat16)),
]
HEADER = ppb.PushHeader(
    member=common.MemberRef(member_id="worker-1", incarnation=3),
    base_version=41, sample_count=32, request_id="abc", tensors=len(TENSORS),
    rows=[common.RowSelection(name="emb", rows=[1, 5, 9])],
)


def generated_push(chunk_bytes: int) -> list[bytes]:
    out, first = [], True
    for chunks in codec.pack(TENSORS, chunk_bytes):
        msg = ppb.PushRequest(header=HEADER, chunks=chunks) if first else ppb.PushRequest(chunks=chunks)
        first = False
        out.append(msg.SerializeToString())
    return out


def generated_pull(version: int, chunk_bytes: int, push: ppb.PushResponse | None) -> list[bytes]:
    out = []
    for chunks in codec.pack(TENSORS, chunk_bytes):
        msg = ppb.PullResponse(version=version, chunks=chunks)
        if push is not None and not out:
            msg.push.CopyFrom(push)
        out.append(msg.SerializeToString())
    return out


@pytest.mark.parametrize("chunk_bytes", [1, 7, 16, 1 << 20])
def test_push_bytes_equal_the_generated_classes(chunk_bytes):
    assert list(data_wire.encode_push(HEADER, TENSORS, chunk_bytes)) == generated_push(chunk_bytes)


@pytest.mark.parametrize("chunk_bytes", [1, 7, 1 << 20])
@pytest.mark.parametrize("version", [0, 1, 1 << 40])
@pytest.mark.parametrize("push", [None, ppb.PushResponse(), ppb.PushResponse(outcome=1, version=9, staleness=2)])
def test_pull_bytes_equal_the_generated_classes(chunk_bytes, version, push):
    assert data_wire.encode_pull(version, TENSORS, chunk_bytes, push) == generated_pull(version, chunk_bytes, push)


def test_an_empty_push_and_pull_are_one_message():
    assert list(data_wire.encode_push(HEADER, [], 16)) == [ppb.PushRequest(header=HEADER).SerializeToString()]
    assert data_wire.encode_pull(3, [], 16) == [ppb.PullResponse(version=3).SerializeToString()]


def assemble(messages) -> dict[str, torch.Tensor]:
    assembler = codec.TensorAssembler()
    for msg in messages:
        for chunk in msg.chunks:
            assembler.add(chunk)
    return assembler.finish()


def assert_same(got: dict[str, torch.Tensor]) -> None:
    assert list(got) == [n for n, _ in TENSORS]
    for name, t in TENSORS:
        assert got[name].dtype == t.dtype and got[name].shape == t.shape and torch.equal(got[name], t), name


@pytest.mark.parametrize("chunk_bytes", [1, 5, 1 << 20])
def test_generated_bytes_decode_by_hand(chunk_bytes):
    pushes = [data_wire.decode_push(b) for b in generated_push(chunk_bytes)]
    assert all(isinstance(m, data_wire.PushMessage) for m in pushes)  # the fast path, not the fallback
    assert pushes[0].HasField("header") and pushes[0].header == HEADER
    assert not any(m.HasField("header") for m in pushes[1:])
    assert_same(assemble(pushes))
    push = ppb.PushResponse(outcome=2, version=5)
    pulls = [data_wire.decode_pull(b) for b in generated_pull(1 << 40, chunk_bytes, push)]
    assert all(isinstance(m, data_wire.PullMessage) for m in pulls)
    assert pulls[0].push == push and not pulls[1:] or not pulls[1].HasField("push")
    assert {m.version for m in pulls} == {1 << 40}
    assert_same(assemble(pulls))


def test_hand_bytes_decode_by_the_generated_classes():
    for raw in data_wire.encode_push(HEADER, TENSORS, 1 << 20):
        msg = ppb.PushRequest.FromString(raw)
        assert msg.header == HEADER
        assert_same(assemble([msg]))
    (raw,) = data_wire.encode_pull(-5, TENSORS, 1 << 20, ppb.PushResponse(outcome=1))
    msg = ppb.PullResponse.FromString(raw)
    assert msg.version == -5 and msg.push.outcome == 1
    assert_same(assemble([msg]))


def _field(number: int, wire: int, payload: bytes) -> bytes:
    key = data_wire._varint_bytes(number << 3 | wire)
    if wire == 2:
        return key + data_wire._varint_bytes(len(payload)) + payload
    return key + payload


def chunk_fields(name: bytes, dtype: int, shape: list[int], offset: int, data: bytes) -> list[bytes]:
    packed = b"".join(data_wire._varint_bytes(d) for d in shape)
    return [
        _field(1, 2, name), _field(2, 0, data_wire._varint_bytes(dtype)), _field(3, 2, packed),
        _field(4, 0, data_wire._varint_bytes(offset)), _field(5, 2, data),
    ]


def test_fields_in_any_order_unpacked_shapes_and_repeated_scalars_decode_as_protobuf_does():
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    fields = chunk_fields(b"w", common.DTYPE_FLOAT32, [2, 3], 0, data)
    unpacked = _field(3, 0, b"\x02") + _field(3, 0, b"\x03")
    variants = [
        b"".join(reversed(fields)),
        b"".join([fields[0], fields[1], unpacked, fields[4]]),
        b"".join([_field(1, 2, b"old"), *fields]),  # a repeated scalar: the last one wins
    ]
    header = _field(1, 2, HEADER.SerializeToString())
    for chunk in variants:
        raw = _field(2, 2, chunk) + header  # the header after the chunks
        hand, generated = data_wire.decode_push(raw), ppb.PushRequest.FromString(raw)
        assert isinstance(hand, data_wire.PushMessage)
        assert hand.header == generated.header
        (c,), (g,) = hand.chunks, generated.chunks
        assert (c.name, c.dtype, list(c.shape), c.offset_bytes, bytes(c.data)) == (
            g.name, g.dtype, list(g.shape), g.offset_bytes, g.data
        )
    pull = _field(2, 2, variants[0]) + _field(1, 0, b"\x07") + _field(1, 0, b"\x09")
    hand, generated = data_wire.decode_pull(pull), ppb.PullResponse.FromString(pull)
    assert isinstance(hand, data_wire.PullMessage) and hand.version == generated.version == 9


@pytest.mark.parametrize(
    "extra",
    [
        _field(9, 0, b"\x01"),  # unknown varint field
        _field(9, 2, b"xyz"),  # unknown length-delimited field
        _field(9, 1, b"\x00" * 8) + _field(10, 5, b"\x00" * 4),  # fixed64 / fixed32
        b"\x4b" + _field(1, 0, b"\x01") + b"\x4c",  # a group (field 9)
    ],
    ids=["varint", "bytes", "fixed", "group"],
)
@pytest.mark.parametrize("inside", [False, True], ids=["in-message", "in-chunk"])
def test_unknown_fields_are_skipped_as_protobuf_skips_them(extra, inside):
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    chunk = b"".join(chunk_fields(b"w", common.DTYPE_FLOAT32, [6], 0, data))
    if inside:
        chunk += extra
    raw = _field(1, 2, HEADER.SerializeToString()) + _field(2, 2, chunk) + (b"" if inside else extra)
    for decode, cls in ((data_wire.decode_push, ppb.PushRequest), (data_wire.decode_pull, ppb.PullResponse)):
        if cls is ppb.PullResponse:
            raw_ = _field(2, 2, chunk) + (b"" if inside else extra)
        else:
            raw_ = raw
        msg = decode(raw_)
        assert torch.equal(assemble([msg])["w"], torch.arange(6, dtype=torch.float32))


MALFORMED = [
    b"\xff\xff\xff\xff\x0f",  # a truncated varint
    b"\x12\x05ab",  # a length past the end
    b"\x12\x03\x0a\x02\xc3",  # a chunk name cut inside a multi-byte character
    _field(2, 2, _field(1, 2, b"\xff\xfe")),  # a chunk name that is not UTF-8
    b"\x0a\x02\x08",  # a header cut short
    b"\x00\x01",  # field number 0
    b"\x12\x01\x0c",  # an end-group without a start
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_bytes_raise_what_the_generated_classes_raise(raw):
    for decode, cls in ((data_wire.decode_push, ppb.PushRequest), (data_wire.decode_pull, ppb.PullResponse)):
        with pytest.raises(DecodeError):
            cls.FromString(raw)
        with pytest.raises(DecodeError):
            decode(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_decode_as_the_generated_classes_decode_them(raw):
    for decode, cls in ((data_wire.decode_push, ppb.PushRequest), (data_wire.decode_pull, ppb.PullResponse)):
        try:
            expected = cls.FromString(raw)
        except DecodeError:
            with pytest.raises(DecodeError):
                decode(raw)
            continue
        got = decode(raw)
        if isinstance(got, cls):
            assert got == expected
            continue
        assert [(c.name, c.dtype, list(c.shape), c.offset_bytes, bytes(c.data)) for c in got.chunks] == [
            (c.name, c.dtype, list(c.shape), c.offset_bytes, c.data) for c in expected.chunks
        ]
        if cls is ppb.PushRequest:
            assert got.HasField("header") == expected.HasField("header")
            assert not got.HasField("header") or got.header == expected.header
        else:
            assert got.version == expected.version
            assert got.HasField("push") == expected.HasField("push")
            assert not got.HasField("push") or got.push == expected.push


def test_a_whole_tensor_in_one_chunk_is_read_in_place_and_a_split_one_is_copied():
    (raw,) = data_wire.encode_pull(1, [("w", torch.arange(4.0))], 1 << 20)
    whole = assemble([data_wire.decode_pull(raw)])["w"]
    start = np.frombuffer(raw, dtype=np.uint8).ctypes.data
    assert start <= whole.data_ptr() < start + len(raw)  # a view of the received message
    split = assemble([data_wire.decode_pull(b) for b in data_wire.encode_pull(1, [("w", torch.arange(4.0))], 4)])
    assert torch.equal(whole, torch.arange(4.0)) and torch.equal(split["w"], torch.arange(4.0))


def test_the_identity_check_sees_the_member_of_a_hand_decoded_push():
    from lepton.auth import Principal, identity_violation

    (raw,) = data_wire.encode_push(HEADER, TENSORS, 1 << 20)
    msg = data_wire.decode_push(raw)
    assert isinstance(msg, data_wire.PushMessage) and msg.ByteSize() == len(raw)
    method = "/lepton.v1.ParameterServer/PushPullUnary"
    assert identity_violation(Principal("w1", "worker", "worker-1"), method, msg) is None
    why = identity_violation(Principal("w2", "worker", "worker-2"), method, msg)
    assert why is not None and "'worker-1'" in why
