"""Well-formed but random messages, built by hypothesis from the lepton.v1 descriptors, sent to
every method of every service (enumerated from the descriptors, so a new RPC is covered without
editing this file): each gets a precise status — never UNKNOWN, INTERNAL or UNIMPLEMENTED — a
request that names a member is never accepted from a stranger, an error changes nothing a caller
can observe, and the server keeps serving.

Random bytes that are no message at all are test_hostile_bytes.py's; hand-made malformed requests
are test_bad_input.py's. Here every message decodes: the values are what is random (unknown enum
numbers, negative and extreme integers, NaN and infinite doubles, unicode, repeated and nested
fields, tensor chunks with real names but wrong shapes or non-finite values, ...).
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor as pbd
from google.protobuf import json_format, message_factory
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from lepton import codec
from lepton.auth import ADMIN_METHODS
from lepton.codec import TensorSpec
from lepton.config import JobSpec
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from support import wait_until

from .conftest import start_cluster, stop_cluster
from .raw_rpc import METHODS

EXAMPLES_PER_METHOD = 40
CALL_TIMEOUT_S = 5.0
# Server streams that never end by themselves (WatchJob follows the job until cancelled): read with
# this short deadline, so DEADLINE_EXCEEDED is their normal end, not an error.
OPEN_ENDED = {"WatchJob"}
OPEN_ENDED_TIMEOUT_S = 0.25
STREAM_READ_MESSAGES = 3  # a response stream is read this far, then cancelled
# Methods whose success may change the job without naming a member: registration, and job control
# (the admin-only methods of the one method-to-role table). CancelJob ends the job (the parameter
# servers then stop), so it runs against a cluster of its own.
JOB_ENDING = {"CancelJob"}
MAY_CHANGE_STATE = {"/lepton.v1.Coordinator/RegisterMember"} | ADMIN_METHODS
SETTLE_S = 0.3  # after a method that may change state: how long the state must hold still

# Precise codes only (RESOURCE_EXHAUSTED: a message above a server's limit, which these small
# messages should never be); never UNKNOWN, INTERNAL or UNIMPLEMENTED.
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}

MAX_DEPTH = 3  # nested messages deeper than this stay unset
MAX_REPEATED = 3
MAX_STRING = 24
MAX_BYTES = 1024  # hypothesis draws every byte: bigger payloads come from plausible_chunks instead

HYPOTHESIS = settings(
    max_examples=EXAMPLES_PER_METHOD,
    deadline=None,
    derandomize=True,  # the same examples on every run and every machine
    database=None,
    suppress_health_check=list(HealthCheck),
)

# --- random messages from descriptors -------------------------------------------------------------

FD = pbd.FieldDescriptor
_INT_BOUNDS = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1),
    FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1),
    FD.TYPE_FIXED64: (0, 2**64 - 1),
}


def integers(lo: int, hi: int) -> st.SearchStrategy[int]:
    """Any integer in [lo, hi], with the boundaries and the small values that mean something
    (0: unset, 1, -1) drawn often."""
    edges = sorted(v for v in {lo, hi, 0, 1, -1} if lo <= v <= hi)
    return st.one_of(st.sampled_from(edges), st.integers(lo, hi))


@dataclass(eq=False)
class Hints:
    """Values that make a random message plausible enough to get past the first checks.

    ``messages`` replaces the generic strategy of a message type (by full name); ``values`` adds
    alternatives for one field's values (by the field's full name); ``streams`` replaces the
    generic request stream of a client-streaming method (by its request type's full name).
    """

    messages: Mapping[str, st.SearchStrategy[Message]] = field(default_factory=dict)
    values: Mapping[str, st.SearchStrategy[Any]] = field(default_factory=dict)
    streams: Mapping[str, st.SearchStrategy[list[Message]]] = field(default_factory=dict)


NO_HINTS = Hints()


def _scalar(f: pbd.FieldDescriptor) -> st.SearchStrategy[Any]:
    if f.type in _INT_BOUNDS:
        return integers(*_INT_BOUNDS[f.type])
    if f.type == FD.TYPE_DOUBLE:
        return st.floats()  # NaN, +-inf, +-0.0, subnormals and extremes included
    if f.type == FD.TYPE_FLOAT:
        return st.floats(width=32)
    if f.type == FD.TYPE_BOOL:
        return st.booleans()
    if f.type == FD.TYPE_STRING:
        return st.text(max_size=MAX_STRING)  # any unicode; protobuf strings hold no surrogates
    if f.type == FD.TYPE_BYTES:
        return st.binary(max_size=MAX_BYTES)
    if f.type == FD.TYPE_ENUM:
        known = st.sampled_from([v.number for v in f.enum_type.values])
        if f.enum_type.is_closed:
            return known
        # proto3 enums are open: an unknown number decodes and must be judged by the receiver.
        # Known values are drawn three times in four, so that most examples get past the enum.
        unknown = integers(-(2**31), 2**31 - 1)
        return st.sampled_from([True, True, True, False]).flatmap(lambda k: known if k else unknown)
    raise TypeError(f"no strategy for field {f.full_name} of type {f.type}")


def _value(f: pbd.FieldDescriptor, hints: Hints, depth: int) -> st.SearchStrategy[Any]:
    generic = random_message(f.message_type, hints, depth + 1) if f.type == FD.TYPE_MESSAGE else _scalar(f)
    hint = hints.values.get(f.full_name)
    return generic if hint is None else st.one_of(hint, generic)


def _is_map(f: pbd.FieldDescriptor) -> bool:
    return f.type == FD.TYPE_MESSAGE and f.message_type.GetOptions().map_entry


@functools.cache
def random_message(
    descriptor: pbd.Descriptor, hints: Hints = NO_HINTS, depth: int = 0
) -> st.SearchStrategy[Message]:
    """Messages of ``descriptor``'s type with every field drawn at random or left unset: scalars by
    field type, open enums including unknown numbers, repeated and map fields of up to
    MAX_REPEATED entries, at most one field of each oneof, nested messages up to MAX_DEPTH."""
    if descriptor.full_name in hints.messages:
        return hints.messages[descriptor.full_name]
    cls = message_factory.GetMessageClass(descriptor)

    @st.composite
    def build(draw) -> Message:
        msg = cls()
        chosen = {
            o.name: draw(st.sampled_from([None, *o.fields])) for o in descriptor.oneofs
        }
        for f in descriptor.fields:
            if f.containing_oneof is not None and chosen[f.containing_oneof.name] is not f:
                continue
            if f.type == FD.TYPE_MESSAGE and depth >= MAX_DEPTH:
                continue
            if _is_map(f):
                key_f, value_f = f.message_type.fields_by_name["key"], f.message_type.fields_by_name["value"]
                entries = draw(
                    st.dictionaries(_scalar(key_f), _value(value_f, hints, depth + 1), max_size=MAX_REPEATED)
                )
                target = getattr(msg, f.name)
                for k, v in entries.items():
                    if value_f.type == FD.TYPE_MESSAGE:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif f.is_repeated:
                getattr(msg, f.name).extend(draw(st.lists(_value(f, hints, depth), max_size=MAX_REPEATED)))
            else:
                # A hinted message (a MemberRef, say) is set more often than not, so that most
                # examples get past "field missing" to the checks behind it.
                hinted = f.type == FD.TYPE_MESSAGE and f.message_type.full_name in hints.messages
                if not draw(st.sampled_from([True, True, False] if hinted else [True, False])):
                    continue
                v = draw(_value(f, hints, depth))
                if f.type == FD.TYPE_MESSAGE:
                    getattr(msg, f.name).CopyFrom(v)
                else:
                    setattr(msg, f.name, v)
        return msg

    return build()


class Requests(list):
    """A request stream whose repr stays short enough to read when hypothesis reports it."""

    def __repr__(self) -> str:
        text = repr([json_format.MessageToDict(m) for m in self])
        return text if len(text) <= 1200 else text[:1200] + " ...]"

    def _repr_pretty_(self, printer, cycle: bool) -> None:
        printer.text(repr(self))


def random_requests(method: pbd.MethodDescriptor, hints: Hints) -> st.SearchStrategy[list[Message]]:
    """One random request, or 0..MAX_REPEATED of them for a request stream."""
    one = random_message(method.input_type, hints)
    if not method.client_streaming:
        return st.lists(one, min_size=1, max_size=1).map(Requests)
    generic = st.lists(one, max_size=MAX_REPEATED).map(Requests)
    plausible = hints.streams.get(method.input_type.full_name)
    return generic if plausible is None else st.one_of(plausible, generic)


def names_a_member(descriptor: pbd.Descriptor, seen: frozenset[str] = frozenset()) -> bool:
    """Whether a message of this type can carry a MemberRef (at any depth)."""
    for f in descriptor.fields:
        if f.type != FD.TYPE_MESSAGE or f.message_type.full_name in seen:
            continue
        if f.message_type.full_name == common.MemberRef.DESCRIPTOR.full_name:
            return True
        if names_a_member(f.message_type, seen | {descriptor.full_name}):
            return True
    return False


# --- plausible tensors -----------------------------------------------------------------------------

non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])


@st.composite
def plausible_chunks(draw, specs: Sequence[TensorSpec], perturb: bool = True, poison: bool = False):
    """Every tensor of ``specs`` encoded as the codec would: one drawn fill value (NaN, +-inf and
    extremes included) with perhaps one odd element; with ``poison``, at least one element is
    NaN or infinite; with ``perturb``, perhaps one chunk then broken (dropped, renamed, another
    dtype or shape, moved, cut short or lengthened)."""
    tensors = []
    for spec in specs:
        if spec.dtype.is_floating_point:
            t = torch.full(spec.shape, draw(st.floats(width=32)), dtype=spec.dtype)
        else:
            t = torch.zeros(spec.shape, dtype=spec.dtype)
        tensors.append((spec.name, t))
    odd_values = non_finite if poison else st.none() | st.floats(width=32)
    odd = draw(odd_values)
    candidates = [i for i, (_, t) in enumerate(tensors) if t.is_floating_point() and t.numel()]
    if odd is not None and candidates:
        _, t = tensors[draw(st.sampled_from(candidates))]
        t.view(-1)[draw(st.integers(0, t.numel() - 1))] = odd
    chunks = [c for name, t in tensors for c in codec.to_wire(name, t)]
    if perturb and chunks and draw(st.booleans()):
        i = draw(st.integers(0, len(chunks) - 1))
        how = draw(st.sampled_from(["drop", "name", "dtype", "shape", "offset", "cut", "extend"]))
        c = chunks[i]
        if how == "drop":
            del chunks[i]
        elif how == "name":
            c.name = draw(st.text(max_size=MAX_STRING))
        elif how == "dtype":
            c.dtype = draw(integers(-(2**31), 2**31 - 1))
        elif how == "shape":
            c.ClearField("shape")
            c.shape.extend(draw(st.lists(integers(-(2**63), 2**63 - 1), max_size=4)))
        elif how == "offset":
            c.offset_bytes = draw(integers(-(2**63), 2**63 - 1))
        elif how == "cut":
            c.data = c.data[: draw(st.integers(0, max(0, len(c.data) - 1)))]
        else:
            c.data = c.data + draw(st.binary(min_size=1, max_size=16))
    return chunks


@st.composite
def push_stream(draw, headers: st.SearchStrategy[ppb.PushHeader], chunks: st.SearchStrategy[list]):
    """A push as a client sends it: the header, then the chunks spread over up to three messages."""
    all_chunks = draw(chunks)
    cuts = sorted(draw(st.lists(st.integers(0, len(all_chunks)), max_size=2)))
    bounds = [0, *cuts, len(all_chunks)]
    messages = [ppb.PushRequest(chunks=all_chunks[a:b]) for a, b in pairwise(bounds)]
    messages[0].header.CopyFrom(draw(headers))
    return Requests(messages)


# --- the servers, as a caller sees them -----------------------------------------------------------


def _without_clock(status: cpb.GetStatusResponse) -> dict:
    """GetStatus less what moves with the clock alone."""
    status = cpb.GetStatusResponse.FromString(status.SerializeToString())
    for name in ("training_seconds", "samples_per_second"):
        status.ClearField(name)
    for m in status.members:
        m.ClearField("last_heartbeat_age_s")
    return json_format.MessageToDict(status, preserving_proto_field_name=True)  # NaN as "NaN": equal to itself


# Server counters that count traffic, rejected requests included (by design): not state.
_TRAFFIC = ("pushes_received", "pushes_rejected", "bytes_pulled", "bytes_pushed")


@dataclass
class Target:
    """A running cluster reached over raw channels, with a worker registered the proper way (its
    pulls read the parameters) and the hints that make random messages plausible."""

    coordinator: grpc.Channel
    server: grpc.Channel | None
    worker: common.MemberRef | None
    specs: list[TensorSpec]
    live: set[tuple[str, int]] = field(default_factory=set)  # (member id, incarnation) alive now

    @property
    def coord(self) -> cpb_grpc.CoordinatorStub:
        return cpb_grpc.CoordinatorStub(self.coordinator)

    @property
    def ps(self) -> ppb_grpc.ParameterServerStub:
        return ppb_grpc.ParameterServerStub(self.server)

    def channel(self, service: pbd.ServiceDescriptor) -> grpc.Channel:
        return self.coordinator if service.name == "Coordinator" else self.server

    def state(self) -> dict:
        """What a caller can observe of the job and the parameters; refreshes ``live``."""
        status = self.coord.GetStatus(cpb.GetStatusRequest(), timeout=CALL_TIMEOUT_S)
        self.live = {(m.member.member_id, m.member.incarnation) for m in status.members if m.alive}
        observed = {"coordinator": _without_clock(status)}
        if self.server is not None:
            ps_status = json_format.MessageToDict(
                self.ps.GetServerStatus(ppb.GetServerStatusRequest(), timeout=CALL_TIMEOUT_S),
                preserving_proto_field_name=True,
            )
            observed["server"] = {k: v for k, v in ps_status.items() if k not in _TRAFFIC}
            observed["parameters"] = self.parameters()
        return observed

    def parameters(self) -> dict[str, Any]:
        digests: dict[str, Any] = {}
        for msg in self.ps.Pull(ppb.PullRequest(member=self.worker), timeout=CALL_TIMEOUT_S):
            digests["version"] = msg.version
            for c in msg.chunks:
                key = f"{c.name}@{c.offset_bytes}"
                digests[key] = (c.dtype, list(c.shape), hashlib.sha256(c.data).hexdigest())
        return digests

    def serving(self) -> bool:
        channels = [self.coordinator] + ([self.server] if self.server is not None else [])
        return all(
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S).status
            == health_pb2.HealthCheckResponse.SERVING
            for ch in channels
        )

    def hints(self) -> Hints:
        """MemberRefs are strangers (never a live identity: a random id, or a known id with another
        incarnation); tensor names, chunks and pushes are sometimes this server's own."""
        known_ids = sorted({member_id for member_id, _ in self.live})
        incarnations = integers(1, 2**63 - 1)
        strangers = st.one_of(
            random_message(common.MemberRef.DESCRIPTOR),  # empty ids and incarnations < 1 included
            st.builds(common.MemberRef, member_id=st.text(min_size=1, max_size=MAX_STRING), incarnation=incarnations),
            st.builds(common.MemberRef, member_id=st.sampled_from(known_ids), incarnation=incarnations),
        ).filter(lambda ref: (ref.member_id, ref.incarnation) not in self.live)
        names = st.sampled_from([s.name for s in self.specs])
        base = Hints(
            messages={common.MemberRef.DESCRIPTOR.full_name: strangers},
            values={
                "lepton.v1.TensorChunk.name": names,
                "lepton.v1.TensorInfo.name": names,
                "lepton.v1.PullRequest.names": names,
            },
        )
        chunks = plausible_chunks(self.specs)
        messages = dict(base.messages)
        messages[common.TensorChunk.DESCRIPTOR.full_name] = st.one_of(
            chunks.filter(bool).flatmap(st.sampled_from), random_message(common.TensorChunk.DESCRIPTOR, base)
        )
        with_chunks = Hints(messages=messages, values=base.values)
        headers = random_message(ppb.PushHeader.DESCRIPTOR, with_chunks)
        return Hints(
            messages=messages,
            values=base.values,
            streams={ppb.PushRequest.DESCRIPTOR.full_name: push_stream(headers, chunks)},
        )


def exchange(
    channel: grpc.Channel, method: pbd.MethodDescriptor, requests: list[Message]
) -> tuple[grpc.StatusCode, str]:
    """Sends ``requests`` (one, or all of them on a request stream); reads a response stream for
    at most STREAM_READ_MESSAGES messages, then cancels it. Returns the status and its details."""
    kind = {
        (False, False): channel.unary_unary,
        (False, True): channel.unary_stream,
        (True, False): channel.stream_unary,
        (True, True): channel.stream_stream,
    }[(method.client_streaming, method.server_streaming)]
    response_cls = message_factory.GetMessageClass(method.output_type)
    rpc = kind(
        f"/{method.containing_service.full_name}/{method.name}",
        request_serializer=lambda m: m.SerializeToString(),
        response_deserializer=response_cls.FromString,
    )
    timeout_s = OPEN_ENDED_TIMEOUT_S if method.name in OPEN_ENDED else CALL_TIMEOUT_S
    request = iter(requests) if method.client_streaming else requests[0]
    try:
        if method.server_streaming:
            call = rpc(request, timeout=timeout_s)
            try:
                for _, _ in zip(range(STREAM_READ_MESSAGES), call, strict=False):
                    pass
            finally:
                call.cancel()
        else:
            rpc(request, timeout=timeout_s)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""


def probe_method(target: Target, method: pbd.MethodDescriptor) -> None:
    """Sends up to EXAMPLES_PER_METHOD random requests to ``method`` (fewer when its request type
    has fewer distinct values: an empty message has one) and checks each answer and the state."""
    path = f"/{method.containing_service.full_name}/{method.name}"
    channel = target.channel(method.containing_service)
    needs_member = names_a_member(method.input_type)
    may_change = path in MAY_CHANGE_STATE
    allowed = ALLOWED | ({grpc.StatusCode.DEADLINE_EXCEEDED} if method.name in OPEN_ENDED else set())
    observed = [target.state()]  # the state before the next example; fills target.live for the hints
    protected_ids = frozenset(member_id for member_id, _ in target.live)
    counts: dict[str, int] = {}

    @HYPOTHESIS
    @given(random_requests(method, target.hints()))
    def probe(requests: list[Message]) -> None:
        if method.name == "RegisterMember":
            # Re-registering a member under test is legitimate, but would fence it mid-test.
            assume(all(r.member_id not in protected_ids for r in requests))
        # Nothing else acts on the cluster between examples, so one example's state after is the
        # next one's state before; but a change a previous success set off may still be running.
        before = target.state() if may_change else observed[-1]
        code, details = exchange(channel, method, requests)
        observed[-1] = after = target.state()
        counts[code.name] = counts.get(code.name, 0) + 1
        shown = repr(requests)
        assert code in allowed, f"{path} answered {code.name} ({details}) to {shown}"
        if needs_member:
            assert code is not grpc.StatusCode.OK, f"{path} accepted a stranger: {shown}"
        if code is not grpc.StatusCode.OK or not may_change:
            assert after == before, f"{path} answered {code.name} ({details}) but changed state: {shown}"

    probe()
    if may_change:  # let what the successes set off finish before the next method is judged
        wait_until(lambda: _settled(target), 30, f"the state to settle after {path}")
    assert target.serving(), f"{path}: a server stopped serving"
    target.coord.GetStatus(cpb.GetStatusRequest(), timeout=CALL_TIMEOUT_S)
    print(path, dict(sorted(counts.items())))  # shown with -rP: how deep the examples reached


def _settled(target: Target) -> bool:
    first = target.state()
    time.sleep(SETTLE_S)
    return target.state() == first


def _training(coord: cpb_grpc.CoordinatorStub) -> bool:
    return coord.GetStatus(cpb.GetStatusRequest(), timeout=CALL_TIMEOUT_S).state == cpb.JOB_STATE_TRAINING


def _specs(coord: cpb_grpc.CoordinatorStub) -> list[TensorSpec]:
    layout = coord.GetLayout(cpb.GetLayoutRequest(), timeout=CALL_TIMEOUT_S)
    return [
        TensorSpec(t.name, codec.torch_dtype(t.dtype), tuple(t.shape)) for s in layout.servers for t in s.tensors
    ]


@pytest.fixture(scope="module")
def target(idle_cluster) -> Iterator[Target]:
    coordinator = grpc.insecure_channel(idle_cluster.coordinator)
    server = grpc.insecure_channel(idle_cluster.servers[0])
    coord = cpb_grpc.CoordinatorStub(coordinator)
    wait_until(lambda: _training(coord), 60, "training")
    worker = coord.RegisterMember(cpb.RegisterMemberRequest(role=common.ROLE_WORKER), timeout=CALL_TIMEOUT_S).member
    t = Target(coordinator, server, worker, _specs(coord))
    wait_until(lambda: t.parameters(), 10, "the server to know the worker")  # its roster follows heartbeats
    yield t
    coordinator.close()
    server.close()


EVERY_METHOD = [(s, m) for s, m in METHODS if m.name not in JOB_ENDING]
JOB_ENDING_METHODS = [(s, m) for s, m in METHODS if m.name in JOB_ENDING]


def _ids(methods: Sequence[tuple[pbd.ServiceDescriptor, pbd.MethodDescriptor]]) -> list[str]:
    return [f"{s.name}.{m.name}" for s, m in methods]


@pytest.mark.parametrize("service, method", EVERY_METHOD, ids=_ids(EVERY_METHOD))
def test_random_messages_get_a_precise_status_and_errors_change_nothing(target, service, method):
    probe_method(target, method)


@pytest.mark.parametrize("service, method", JOB_ENDING_METHODS, ids=_ids(JOB_ENDING_METHODS))
def test_random_messages_to_a_job_ending_method_get_a_precise_status(tmp_path, service, method):
    spec = JobSpec(
        epochs=1, shards_per_epoch=4, parameter_servers=1, heartbeat_interval_s=0.2, heartbeat_timeout_s=600.0
    )
    cluster = start_cluster(tmp_path, spec)
    coordinator = grpc.insecure_channel(cluster.coordinator)
    try:
        coord = cpb_grpc.CoordinatorStub(coordinator)
        wait_until(lambda: _training(coord), 60, "training")
        # Only the coordinator is observed: the parameter servers stop once the job has ended.
        probe_method(Target(coordinator, None, None, _specs(coord)), method)
    finally:
        coordinator.close()
        stop_cluster(cluster)


@pytest.mark.parametrize("method_name", ["Push", "PushPull"])
def test_a_registered_workers_non_finite_gradient_is_rejected_and_changes_nothing(target, method_name):
    """Well-formed pushes from a live worker, every tensor present with the right dtype and shape,
    but at least one element NaN or infinite: INVALID_ARGUMENT, and nothing is applied."""
    method = ppb.DESCRIPTOR.services_by_name["ParameterServer"].methods_by_name[method_name]
    version = target.parameters()["version"]
    headers = st.builds(
        ppb.PushHeader,
        member=st.just(target.worker),
        base_version=st.just(version),
        sample_count=integers(1, 2**63 - 1),
        request_id=st.text(max_size=MAX_STRING),
    )

    @settings(HYPOTHESIS, max_examples=15)
    @given(push_stream(headers, plausible_chunks(target.specs, perturb=False, poison=True)))
    def probe(requests: list[ppb.PushRequest]) -> None:
        before = target.state()
        code, details = exchange(target.server, method, requests)
        assert code is grpc.StatusCode.INVALID_ARGUMENT, f"{method_name} answered {code.name} ({details})"
        assert "NaN" in details or "finite" in details, details
        assert target.state() == before

    probe()
    assert target.serving()


def test_the_strategy_covers_every_field_type_of_the_contract():
    """Every field type used by any lepton.v1 message has a strategy, so a new field cannot make
    the random messages fail to build."""
    for module in (common, cpb, ppb):
        for descriptor in module.DESCRIPTOR.message_types_by_name.values():

            @settings(HYPOTHESIS, max_examples=5)
            @given(random_message(descriptor))
            def builds(msg: Message) -> None:
                assert type(msg).FromString(msg.SerializeToString()) == msg or _has_nan(msg)

            builds()


def _has_nan(msg: Message) -> bool:
    # NaN != NaN, so a message holding one never equals its own round trip.
    return "NaN" in str(json_format.MessageToDict(msg))

