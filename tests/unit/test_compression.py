"""Gradient compression: each encoding's layout and round trip (lepton/encodings.py), the hand
codec's bytes for encoded chunks against the generated classes, the receiver's refusals, and error
feedback over many steps (worker/compression.py)."""

from __future__ import annotations

import pytest
import torch

from lepton import codec, data_wire
from lepton import encodings as enc
from lepton.config import JobSpec
from lepton.errors import ConfigError, InvalidArgument
from lepton.tensors import TensorKind, TensorSpec, row_slice
from lepton.v1 import common_pb2 as common
from lepton.v1 import parameter_server_pb2 as ppb
from worker.compression import ErrorFeedback

ALL = [enc.FP16, enc.BF16, enc.TOPK, enc.SIGN]


def payload(e: enc.Encoded) -> bytes:
    return bytes(e.payload.numpy())


@pytest.mark.parametrize("encoding", ALL)
@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 4), ()])
def test_decode_gives_what_encode_says_the_receiver_gets(encoding, shape):
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    e, sent = enc.encode(g, encoding, 0.3)
    assert e.dtype == torch.float32 and e.shape == tuple(shape)
    assert torch.equal(enc.decode("g", encoding, torch.float32, tuple(shape), payload(e)), sent)
    assert sent.shape == g.shape and sent.dtype == g.dtype


def test_layout_lengths():
    n = 1000
    g = torch.randn(n)
    assert enc.encode(g, enc.FP16)[0].nbytes == 2 * n
    assert enc.encode(g, enc.BF16)[0].nbytes == 2 * n
    assert enc.encode(g, enc.SIGN)[0].nbytes == 4 + 125
    assert enc.encode(g, enc.TOPK, 0.01)[0].nbytes == 10 * (4 + 4)
    assert enc.encode(g.double(), enc.TOPK, 0.01)[0].nbytes == 10 * (4 + 8)
    assert enc.encode(torch.randn(3), enc.TOPK, 0.01)[0].nbytes == 8  # k = max(1, round(r n))


def test_topk_keeps_the_k_largest_in_magnitude():
    g = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.3, 0.0, 4.0, -0.05])
    e, sent = enc.encode(g, enc.TOPK, 3 / 8)
    raw = payload(e)
    idx = torch.frombuffer(bytearray(raw[:12]), dtype=torch.int32)
    vals = torch.frombuffer(bytearray(raw[12:]), dtype=torch.float32)
    assert sorted(idx.tolist()) == [1, 3, 6]
    assert dict(zip(idx.tolist(), vals.tolist(), strict=True)) == {1: -5.0, 3: 3.0, 6: 4.0}
    assert torch.equal(sent, torch.tensor([0, -5.0, 0, 3.0, 0, 0, 4.0, 0]))


def test_sign_packs_bits_lsb_first_with_the_mean_magnitude_as_scale():
    g = torch.tensor([1.0, -2.0, 3.0, -4.0, 0.0, 6.0, -7.0, 8.0, -9.0, 10.0])
    e, sent = enc.encode(g, enc.SIGN)
    raw = payload(e)
    scale = torch.frombuffer(bytearray(raw[:4]), dtype=torch.float32).item()
    assert scale == pytest.approx(g.abs().mean().item())
    # elements 0..7: + - + - +(0) + - +  -> bits 1,0,1,0,1,1,0,1 = 0b10110101; then - + -> 0b10
    assert raw[4:] == bytes([0b10110101, 0b00000010])
    assert torch.allclose(sent, torch.where(g >= 0, scale, -scale))


def test_fp16_clamps_what_it_cannot_hold_and_the_rest_stays_in_the_residual():
    g = torch.tensor([1e6, -1e6, 1.0])
    _, sent = enc.encode(g, enc.FP16)
    assert torch.isfinite(sent).all() and sent[0] == torch.finfo(torch.float16).max
    fb = ErrorFeedback(enc.FP16)
    spec = TensorSpec("g", torch.float32, (3,))
    out = fb.compress({"g": (spec, g)})
    fb.commit(out)
    assert fb.residual(spec)[0] == pytest.approx(1e6 - 65504.0)


# --- the receiver ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "encoding, data, fragment",
    [
        (enc.FP16, b"\x00" * 6, "need 8"),
        (enc.SIGN, b"\x00\x00\x80\x3f", "need 5"),
        (enc.SIGN, b"\x00\x00\xc0\x7f" + b"\x01", "scale must be finite"),  # NaN
        (enc.SIGN, b"\x00\x00\x80\xbf" + b"\x01", "scale must be finite and >= 0"),  # -1.0
        (enc.SIGN, b"\x00\x00\x80\x3f" + b"\xf1", "unused bits"),
        (enc.TOPK, b"\x00" * 7, "whole number of 8-byte entries"),
        (enc.TOPK, b"\x00" * 40, "5 entries for 4 elements"),
        (enc.TOPK, (4).to_bytes(4, "little") + b"\x00" * 4, "index 4 outside [0, 4)"),
        (enc.TOPK, (-1).to_bytes(4, "little", signed=True) + b"\x00" * 4, "index -1 outside"),
        (enc.TOPK, (1).to_bytes(4, "little") * 2 + b"\x00" * 8, "more than once"),
    ],
)
def test_malformed_encoded_data_is_refused_with_the_reason(encoding, data, fragment):
    with pytest.raises(InvalidArgument) as info:
        enc.decode("g", encoding, torch.float32, (4,), data)
    assert fragment in str(info.value) and "'g'" in str(info.value)


def chunk(name="w", encoding=enc.FP16, data=b"\x00" * 8, offset=0, shape=(4,), dtype=common.DTYPE_FLOAT32):
    return common.TensorChunk(name=name, dtype=dtype, shape=list(shape), offset_bytes=offset, data=data,
                              encoding=encoding)


SPECS = {
    "w": TensorSpec("w", torch.float32, (4,)),
    "rows": TensorSpec("rows", torch.float32, (2, 2), sparse=True),
    "buf": TensorSpec("buf", torch.float32, (4,), kind=TensorKind.BUFFER),
    "steps": TensorSpec("steps", torch.int64, (4,), kind=TensorKind.BUFFER),
    "empty": TensorSpec("empty", torch.float32, (0, 4)),
}


@pytest.mark.parametrize(
    "chunks, fragment",
    [
        ([chunk(encoding=9)], "unknown encoding 9"),
        ([chunk(name="rows", shape=(2, 2))], "pushed by rows"),
        ([chunk(name="buf")], "not a trainable floating-point parameter"),
        ([chunk(name="steps", dtype=common.DTYPE_INT64)], "not a trainable"),
        ([chunk(name="empty", shape=(0, 4), data=b"")], "has no elements"),
        ([chunk(encoding=enc.TOPK, data=b"\x00" * 8, offset=8)], "at offset 0"),
        ([chunk(encoding=enc.TOPK, data=b"\x00" * 8), chunk(encoding=enc.TOPK, data=b"\x01" * 8, offset=8)],
         "one chunk"),
        ([chunk(data=b"\x00" * 4), chunk(encoding=0, data=b"\x00" * 4, offset=4)], "encoding changed"),
        ([chunk(data=b"\x00" * 10)], "needs 8"),
    ],
)
def test_the_assembler_refuses_encodings_it_may_not_take(chunks, fragment):
    assembler = codec.TensorAssembler(SPECS)
    with pytest.raises(InvalidArgument) as info:
        for c in chunks:
            assembler.add(c)
        assembler.finish()
    assert fragment in str(info.value), str(info.value)


def test_fixed_length_encodings_may_be_split_and_decode_whole():
    g = torch.randn(4)
    e, sent = enc.encode(g, enc.FP16)
    data = payload(e)
    assembler = codec.TensorAssembler(SPECS)
    assembler.add(chunk(data=data[:3]))
    assert assembler.received == (1, 0)
    assembler.add(chunk(data=data[3:], offset=3))
    assert assembler.received == (1, 1)
    assert torch.equal(assembler.finish()["w"], sent)


# --- the hand codec ---------------------------------------------------------------------------


def encoded_tensors():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(6, 5, generator=gen)
    return [
        ("a", enc.encode(g, enc.FP16)[0]),
        ("raw", torch.arange(6, dtype=torch.float32)),
        ("b", enc.encode(g, enc.BF16)[0]),
        ("c", enc.encode(g, enc.TOPK, 0.2)[0]),
        ("d", enc.encode(g.double(), enc.SIGN)[0]),
    ]


def generated_push(tensors, header, chunk_bytes: int) -> list[bytes]:
    """What the generated classes write for the same chunks (TOPK never split)."""
    chunks_all: list[list[common.TensorChunk]] = []
    batch: list[common.TensorChunk] = []
    size = 0
    for name, t in tensors:
        if isinstance(t, enc.Encoded):
            data = payload(t)
            step = len(data) if t.encoding == enc.TOPK else chunk_bytes
            pieces = [(o, data[o : o + step]) for o in range(0, len(data), step)]
            made = [common.TensorChunk(name=name, dtype=codec.wire_dtype(t.dtype), shape=list(t.shape),
                                       offset_bytes=o, data=d, encoding=t.encoding) for o, d in pieces]
        else:
            made = list(codec.to_wire(name, t, chunk_bytes))
        for c in made:
            n = len(c.data)
            if batch and size + n > chunk_bytes:
                chunks_all.append(batch)
                batch, size = [], 0
            batch.append(c)
            size += n
    chunks_all.append(batch)
    return [
        (ppb.PushRequest(header=header, chunks=c) if i == 0 else ppb.PushRequest(chunks=c)).SerializeToString()
        for i, c in enumerate(chunks_all)
    ]


@pytest.mark.parametrize("chunk_bytes", [1, 7, 40, 1 << 20])
def test_encoded_push_bytes_equal_the_generated_classes_and_decode_back(chunk_bytes):
    tensors = encoded_tensors()
    header = ppb.PushHeader(request_id="x", tensors=len(tensors), sample_count=1)
    hand = list(data_wire.encode_push(header, tensors, chunk_bytes))
    assert hand == generated_push(tensors, header, chunk_bytes)
    by_hand, by_generated = codec.TensorAssembler(), codec.TensorAssembler()
    for message in hand:
        for c in data_wire.decode_push(message).chunks:
            by_hand.add(c)
        for c in ppb.PushRequest.FromString(message).chunks:
            by_generated.add(c)
    got, want = by_hand.finish(), by_generated.finish()
    for name, t in tensors:
        expected = t if isinstance(t, torch.Tensor) else enc.decode(name, t.encoding, t.dtype, t.shape, payload(t))
        assert torch.equal(got[name], expected) and torch.equal(want[name], expected), name


def test_a_generated_chunk_with_an_encoding_decodes_by_hand():
    c = chunk(data=b"\x01\x02" * 4)
    message = ppb.PushRequest(header=ppb.PushHeader(request_id="r"), chunks=[c]).SerializeToString()
    (got,) = data_wire.decode_push(message).chunks
    assert got.encoding == enc.FP16 and bytes(got.data) == c.data and got.shape == [4]


# --- error feedback ---------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ALL)
def test_error_feedback_sends_the_sum_of_the_gradients_but_the_residual(encoding):
    gen = torch.Generator().manual_seed(0)
    spec = TensorSpec("w", torch.float32, (8, 16))
    fb = ErrorFeedback(encoding, topk_ratio=0.05)
    true_sum = torch.zeros(8, 16, dtype=torch.float64)
    sent_sum = torch.zeros(8, 16, dtype=torch.float64)
    for _ in range(50):
        g = torch.randn(8, 16, generator=gen)
        out = fb.compress({"w": (spec, g)})
        e = out.tensors["w"]
        sent_sum += enc.decode("w", e.encoding, e.dtype, e.shape, payload(e)).double()
        true_sum += g.double()
        fb.commit(out)
    residual = fb.residual(spec).double()
    assert torch.allclose(sent_sum + residual, true_sum, atol=1e-4), (sent_sum + residual - true_sum).abs().max()
    if encoding == enc.TOPK:  # most of it is sent: the residual stays bounded, not the sum of 50 steps
        assert residual.abs().max() < true_sum.abs().max() + 50


def test_nothing_changes_until_commit_and_row_slices_share_one_residual():
    whole = TensorSpec("w", torch.float32, (4, 3))
    top, bottom = row_slice(whole, 0, 2), row_slice(whole, 2, 4)
    fb = ErrorFeedback(enc.SIGN)
    g = torch.randn(4, 3)
    first = fb.compress({top.name: (top, g[:2])})
    assert fb.residual(top) is None
    again = fb.compress({top.name: (top, g[:2])})
    assert payload(first.tensors[top.name]) == payload(again.tensors[top.name])  # uncommitted: same bytes
    fb.commit(first)
    assert torch.equal(fb.residual(bottom), torch.zeros(2, 3))  # not pushed yet
    r = fb.residual(top).clone()
    e, sent = enc.encode(g[:2], enc.SIGN)
    assert torch.allclose(r, g[:2] - sent)
    fb.commit(fb.compress({bottom.name: (bottom, g[2:])}))
    assert torch.equal(fb.residual(top), r)  # committing the bottom rows left the top ones alone


def test_sparse_buffers_integers_and_empty_tensors_travel_raw():
    fb = ErrorFeedback(enc.TOPK)
    sparse = torch.sparse_coo_tensor([[1]], [[1.0, 2.0]], (3, 2), check_invariants=True).coalesce()
    share = {
        "emb": (TensorSpec("emb", torch.float32, (3, 2), sparse=True), sparse),
        "buf": (TensorSpec("buf", torch.float32, (2,), kind=TensorKind.BUFFER), torch.ones(2)),
        "n": (TensorSpec("n", torch.int64, (), kind=TensorKind.BUFFER), torch.tensor(3)),
        "e": (TensorSpec("e", torch.float32, (0,)), torch.zeros(0)),
        "w": (TensorSpec("w", torch.float32, (5,)), torch.randn(5)),
    }
    out = fb.compress(share)
    assert [n for n, t in out.tensors.items() if isinstance(t, enc.Encoded)] == ["w"]
    assert set(out.residuals) == {"w"}


def test_job_settings_are_checked():
    assert ErrorFeedback.for_job(JobSpec()) is None
    fb = ErrorFeedback.for_job(JobSpec(gradient_compression="topk", topk_ratio=0.1))
    assert fb is not None and fb.encoding == enc.TOPK and fb.topk_ratio == 0.1
    with pytest.raises(ConfigError, match="gradient_compression must be one of"):
        JobSpec(gradient_compression="zip")
    for ratio in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match=r"topk_ratio must be in \(0, 1\]"):
            JobSpec(topk_ratio=ratio)


def test_the_flags_and_the_wire_carry_the_setting():
    from lepton.ops.cli import build_parser, job_from_args
    from lepton.ops.cluster import job_flags
    from lepton.wire import job_from_proto, job_to_proto

    for command in ("up", "coordinator"):
        args = build_parser().parse_args([command, "--gradient-compression", "topk", "--topk-ratio", "0.05"])
        spec = job_from_args(args)
        assert (spec.gradient_compression, spec.topk_ratio) == ("topk", 0.05)
    handed_on = job_flags(spec)  # what `lepton up` hands its coordinator
    i = handed_on.index("--gradient-compression")
    assert handed_on[i : i + 4] == ["--gradient-compression", "topk", "--topk-ratio", "0.05"]
    for name in ("none", "fp16", "bf16", "topk", "sign"):
        s = JobSpec(gradient_compression=name, topk_ratio=0.25)
        assert job_from_proto(common.JobSpec.FromString(job_to_proto(s).SerializeToString())) == s
    old = common.JobSpec.FromString(job_to_proto(JobSpec()).SerializeToString())
    old.ClearField("gradient_compression")
    old.ClearField("topk_ratio")  # a sender from before these fields
    assert (job_from_proto(old).gradient_compression, job_from_proto(old).topk_ratio) == ("none", 0.01)
    old.gradient_compression = 99
    with pytest.raises(InvalidArgument, match="gradient compression 99 is not served"):
        job_from_proto(old)


def test_topk_that_would_not_save_bytes_or_fit_one_chunk_travels_raw_and_leaves_no_residual(monkeypatch):
    spec = TensorSpec("w", torch.float32, (100,))
    g = torch.randn(100)
    fb = ErrorFeedback(enc.TOPK, topk_ratio=0.6)  # 60 x 8 bytes > 100 x 4
    fb.commit(fb.compress({"w": (spec, g)}))
    assert torch.equal(fb.residual(spec), torch.zeros(100))
    out = fb.compress({"w": (spec, g)})
    assert torch.equal(out.tensors["w"], g)  # raw, and the residual (zero) added
    monkeypatch.setattr("worker.compression.TOPK_MAX_BYTES", 80)
    small = ErrorFeedback(enc.TOPK, topk_ratio=0.2)  # 20 x 8 = 160 bytes < 400 raw, but over 80
    assert not isinstance(small.compress({"w": (spec, g)}).tensors["w"], enc.Encoded)
    assert isinstance(ErrorFeedback(enc.TOPK, topk_ratio=0.1).compress({"w": (spec, g)}).tensors["w"], enc.Encoded)
