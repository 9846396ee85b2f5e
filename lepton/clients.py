"""Typed client of the ParameterServer service, and the Coordinator's client (from
lepton.coordinator_client, which operator commands import without torch) re-exported.

Same rules as every client: one reused channel, a deadline on every call, lepton.errors at this
boundary, idempotent calls retried on Unavailable. Data-plane calls the server's call limits refuse
(errors.Refused: nothing ran) are sent again, unchanged, after a jittered backoff, within the
call's deadline.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TypeVar, cast

import grpc
import torch

from lepton import codec, data_wire
from lepton.control_wire import member_ref
from lepton.coordinator_client import (  # noqa: F401  (re-exported)
    DEFAULT_TIMEOUT_S,
    AssignmentInfo,
    CoordinatorClient,
    LayoutInfo,
    ServerInfo,
    ServiceClient,
)
from lepton.domain import MemberId
from lepton.encodings import Encoded
from lepton.errors import InvalidArgument, Refused
from lepton.metrics import CLIENT_CALLS
from lepton.retry import RetryPolicy, call_with_retry
from lepton.rpc import call, iterate, translate
from lepton.shm_client import SharedMemoryLink
from lepton.v1 import common_pb2 as common
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc


@dataclass(frozen=True)
class PushReply:
    applied: bool
    version: int
    staleness: int


T = TypeVar("T")
# Backoff between tries of a call the server's limits refused: at least the delay the refusal
# names, plus uniform jitter up to a cap that doubles from 50 ms to 1 s. Bounded by the call's
# deadline, not by a count.
REFUSAL_BACKOFF = RetryPolicy(initial_backoff_s=0.05, max_backoff_s=1.0)
MIN_TRY_S = 0.05  # a try is not started with less time than this left before the deadline


class PendingPushPull:
    """A push-pull in flight (``ParameterClient.push_pull_async``)."""

    def __init__(self, client: ParameterClient, future, fallback: Callable[[float], tuple], deadline: float) -> None:
        self._client = client
        self._future = future
        self._fallback = fallback  # push_pull(timeout_s) of the same push, same request id
        self._deadline = deadline

    def result(self) -> tuple[PushReply, int, dict[str, torch.Tensor]]:
        if self._future is None:
            return self._fallback(0.0)
        try:
            answer = self._future.result()
        except grpc.RpcError as exc:
            try:
                self._client._unary_failed(exc)
            except Refused as refused:
                self._client._back_off(refused, 1, self._deadline)
            return self._fallback(max(0.0, self._deadline - time.monotonic()))
        return self._client._answer(_read_pull([answer], None))


def new_request_id() -> str:
    return uuid.uuid4().hex


_SERVICE = "/" + ppb.DESCRIPTOR.services_by_name["ParameterServer"].full_name + "/"
# A push up to this many bytes (and an answer that was last this small) goes as PushPullUnary:
# one message each way, well inside the 8 MiB default receive limit.
UNARY_MAX_BYTES = 6 << 20


def _identity(data: bytes) -> bytes:
    return data


def _push_parts(
    grads: Iterable[tuple[str, torch.Tensor | Encoded]],
) -> tuple[list[tuple[str, torch.Tensor | Encoded]], list[common.RowSelection]]:
    """A sparse COO gradient (row-sparse, e.g. from ``nn.Embedding(sparse=True)``) travels as its
    rows: a RowSelection in the header and the rows' data under the tensor's name."""
    dense: list[tuple[str, torch.Tensor | Encoded]] = []
    selections = []
    for name, g in grads:
        if isinstance(g, torch.Tensor) and g.is_sparse:
            rows, values = codec.sparse_to_rows(g)
            selections.append(common.RowSelection(name=name, rows=rows.tolist()))
            dense.append((name, values))
        else:
            dense.append((name, g))
    return dense, selections


def _header(
    member: MemberId, base_version: int, samples: int, request_id: str, selections, tensors: int
) -> ppb.PushHeader:
    return ppb.PushHeader(
        member=member_ref(member),
        base_version=base_version,
        sample_count=samples,
        request_id=request_id or new_request_id(),
        rows=selections,
        tensors=tensors,
    )


def _push_messages(
    member: MemberId,
    base_version: int,
    samples: int,
    grads: Iterable[tuple[str, torch.Tensor | Encoded]],
    request_id: str = "",
    chunk_bytes: int = codec.STREAM_CHUNK_BYTES,
) -> Iterator[bytes]:
    """The serialized PushRequest messages of a push (``lepton.data_wire``: chunks straight from
    tensor memory)."""
    dense, selections = _push_parts(grads)
    header = _header(member, base_version, samples, request_id, selections, len(dense))
    return data_wire.encode_push(header, dense, chunk_bytes)


def _read_pull(
    responses: Iterable, timeout_s: float | None
) -> tuple[int, dict[str, torch.Tensor], ppb.PushResponse | None]:
    assembler = codec.TensorAssembler()
    version = -1
    push = None
    for msg in iterate(iter(responses), timeout_s) if timeout_s is not None else responses:
        if version < 0:
            version = msg.version
            push = msg.push if msg.HasField("push") else None
        for chunk in msg.chunks:
            assembler.add(chunk)
    return version, assembler.finish(), push


class ParameterClient(ServiceClient):
    """Client of one parameter server. Raises lepton.errors on failure.

    The data-plane calls bypass the generated message classes (``lepton.data_wire``); a step whose
    push, and whose answer last time, fit in ``UNARY_MAX_BYTES`` takes PushPullUnary.
    ``shared_memory=True``: push-pulls go through shared memory when the server shares this host
    (``lepton.shm_client``), else over gRPC as without it."""

    _stub_class = ppb_grpc.ParameterServerStub

    def __init__(self, *args, shared_memory: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.shm = SharedMemoryLink(self._channel, self.address, self._timeout_s) if shared_memory else None
        ch = self._channel
        self._pull_call = ch.unary_stream(
            _SERVICE + "Pull", request_serializer=ppb.PullRequest.SerializeToString,
            response_deserializer=data_wire.decode_pull,
        )
        self._push_call = ch.stream_unary(
            _SERVICE + "Push", request_serializer=_identity, response_deserializer=ppb.PushResponse.FromString
        )
        self._push_pull_call = ch.stream_stream(
            _SERVICE + "PushPull", request_serializer=_identity, response_deserializer=data_wire.decode_pull
        )
        self._push_pull_unary_call = ch.unary_unary(
            _SERVICE + "PushPullUnary", request_serializer=_identity, response_deserializer=data_wire.decode_pull
        )
        self.unary_max_bytes = UNARY_MAX_BYTES  # 0: always stream (an old server, or answers too big)

        self._last_answer_bytes = 0
        self.refusals_retried = 0  # tries sent again after the server's call limits refused them

    def pull(
        self, member: MemberId, names: Iterable[str] = (), rows: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Whole tensors ``names`` (everything when both are empty) and, of each tensor in ``rows``,
        only those rows (shape [len(rows), ...], in that order)."""
        request = ppb.PullRequest(
            member=member_ref(member),
            names=list(names),
            rows=[common.RowSelection(name=n, rows=r.tolist()) for n, r in (rows or {}).items()],
        )

        def once(timeout_s: float):
            version, tensors, _ = _read_pull(self._pull_call(request, timeout=timeout_s), timeout_s)
            return version, tensors

        return call_with_retry(lambda: self._despite_refusals(once, self._timeout_s), self._retry, rng=self._rng)

    def push_pull(
        self,
        member: MemberId,
        base_version: int,
        samples: int,
        grads: Mapping[str, torch.Tensor | Encoded],
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> tuple[PushReply, int, dict[str, torch.Tensor]]:
        """Retried here only when the server's call limits refuse it (nothing ran), within
        ``timeout_s``. To retry after other failures, call again with the same ``request_id`` (and
        the same ``grads``: an encoded gradient, ``lepton.encodings.Encoded``, travels as it is): the
        server applies a push at most once and answers a retry with the original outcome."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        request_id = request_id or new_request_id()
        dense, selections = _push_parts(grads.items())
        header = _header(member, base_version, samples, request_id, selections, len(dense))
        shared = self._shared(member, header, grads, timeout_s)
        if shared is not None:
            return shared()
        return self._push_pull_grpc(header, dense, timeout_s)

    def _push_pull_grpc(self, header, dense, timeout_s: float) -> tuple[PushReply, int, dict[str, torch.Tensor]]:
        size = sum(data_wire.nbytes(t) for _, t in dense)

        def once(remaining_s: float):
            result = None
            if max(size, self._last_answer_bytes) <= self.unary_max_bytes:
                (message,) = data_wire.encode_push(header, dense, max(size, 1))
                result = self._push_pull_unary(message, remaining_s)
            if result is None:
                responses = self._push_pull_call(
                    data_wire.encode_push(header, dense, codec.STREAM_CHUNK_BYTES), timeout=remaining_s
                )
                result = _read_pull(responses, remaining_s)
            return result

        return self._answer(self._despite_refusals(once, timeout_s))

    def push_pull_async(
        self,
        member: MemberId,
        base_version: int,
        samples: int,
        grads: Mapping[str, torch.Tensor | Encoded],
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> PendingPushPull:
        """``push_pull`` started without waiting: ``result()`` of the returned handle gives its
        answer (or raises). A small step is one PushPullUnary in flight, so a worker sends one to
        every server and then waits, with no thread per server; a large one (a stream) runs here
        before this returns."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        request_id = request_id or new_request_id()
        dense, selections = _push_parts(grads.items())
        header = _header(member, base_version, samples, request_id, selections, len(dense))
        shared = self._shared(member, header, grads, timeout_s)
        if shared is not None:
            return PendingPushPull(self, None, lambda _: shared(), deadline)
        size = sum(data_wire.nbytes(t) for _, t in dense)
        if max(size, self._last_answer_bytes) > self.unary_max_bytes:
            done = self.push_pull(member, base_version, samples, grads, timeout_s, request_id)
            return PendingPushPull(self, None, lambda _: done, deadline)
        (message,) = data_wire.encode_push(header, dense, max(size, 1))
        future = self._push_pull_unary_call.future(message, timeout=timeout_s)
        return PendingPushPull(self, future, lambda remaining_s: self.push_pull(
            member, base_version, samples, grads, remaining_s, request_id
        ), deadline)

    def _despite_refusals(self, attempt: Callable[[float], T], timeout_s: float) -> T:
        """``attempt(time left)`` until the server's call limits stop refusing it (errors.Refused:
        nothing ran, so the same request is sent again) or ``timeout_s`` has passed; then the
        refusal is raised."""
        deadline = time.monotonic() + timeout_s
        tries = 0
        while True:
            tries += 1
            try:
                return attempt(max(0.0, deadline - time.monotonic()))
            except Refused as exc:
                self._back_off(exc, tries, deadline)

    def _back_off(self, refused: Refused, tries: int, deadline: float) -> None:
        """Sleeps before try ``tries + 1`` of a refused call, or raises ``refused`` when the
        call's deadline would pass first."""
        delay = (refused.retry_after_s or 0.0) + REFUSAL_BACKOFF.backoff_s(tries, self._rng)
        if time.monotonic() + delay + MIN_TRY_S > deadline:
            raise refused
        self.refusals_retried += 1
        time.sleep(delay)

    def _shared(self, member: MemberId, header, grads: Mapping[str, torch.Tensor | Encoded], timeout_s: float):
        """The step over shared memory, started: a callable giving its answer (falling back to
        gRPC with the same request id when shared memory cannot finish it), or None. A push with
        an encoded (compressed) gradient goes over gRPC: shared memory carries raw tensors."""
        if self.shm is None or any(isinstance(g, Encoded) for g in grads.values()):
            return None
        started = self.shm.start(member, header, cast(Mapping[str, torch.Tensor], grads), timeout_s)
        if started is None:
            return None

        def finish() -> tuple[PushReply, int, dict[str, torch.Tensor]]:
            answer = started()
            if answer is None:  # nothing was applied, or the same request id answers from memory
                return self._push_pull_grpc(header, _push_parts(grads.items())[0], timeout_s)
            version, tensors, push = answer
            return self._answer((version, tensors, push))

        return finish

    def close(self) -> None:
        if self.shm is not None:
            self.shm.drop()
        super().close()

    def _answer(self, result) -> tuple[PushReply, int, dict[str, torch.Tensor]]:
        version, tensors, push = result
        self._last_answer_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if push is None:
            raise InvalidArgument(f"{self.address} answered PushPull without the push outcome")
        reply = PushReply(push.outcome == ppb.PUSH_OUTCOME_APPLIED, push.version, push.staleness)
        return reply, version, tensors

    def _push_pull_unary(self, message: bytes, timeout_s: float):
        """PushPullUnary's (version, tensors, push), or None when the stream must carry it: the
        server lacks the method (from now on every push streams) or a message was too large
        (nothing applied, or the retry over PushPull with the same request id gets the outcome)."""
        start = time.monotonic()
        try:
            answer = self._push_pull_unary_call(message, timeout=timeout_s)
        except grpc.RpcError as exc:
            self._unary_failed(exc)
            return None
        finally:
            CLIENT_CALLS.record(timeout_s, time.monotonic() - start)
        return _read_pull([answer], None)

    def _unary_failed(self, exc: grpc.RpcError) -> None:
        """Returns when the push should go over the stream instead (see PushPullUnary), else
        raises the domain error."""
        code = exc.code() if hasattr(exc, "code") else None
        if code is grpc.StatusCode.UNIMPLEMENTED:
            self.unary_max_bytes = 0
            return
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and "message larger than max" in (exc.details() or ""):
            self.unary_max_bytes //= 2
            return
        raise translate(exc) from None

    def push(
        self, member: MemberId, base_version: int, samples: int, grads: Mapping[str, torch.Tensor | Encoded],
        timeout_s: float | None = None, request_id: str = "",
    ) -> PushReply:
        request_id = request_id or new_request_id()  # the same on every try
        reply = self._despite_refusals(
            lambda remaining_s: call(
                self._push_call,
                _push_messages(member, base_version, samples, grads.items(), request_id),
                timeout=remaining_s,
            ),
            self._timeout_s if timeout_s is None else timeout_s,
        )
        return PushReply(reply.outcome == ppb.PUSH_OUTCOME_APPLIED, reply.version, reply.staleness)

    def join_steps(self, member: MemberId, from_version: int, timeout_s: float | None = None) -> tuple[bool, int]:
        """(joined, the server's version); see JoinSteps. Not retried: a lost answer is settled
        by LeaveSteps and a new attempt."""
        reply = call(
            self._stub.JoinSteps,
            ppb.JoinStepsRequest(member=member_ref(member), from_version=from_version),
            timeout=self._timeout_s if timeout_s is None else timeout_s,
        )
        return reply.joined, reply.version

    def leave_steps(self, member: MemberId) -> None:
        self._idempotent(self._stub.LeaveSteps, ppb.LeaveStepsRequest(member=member_ref(member)))

    def server_status(self) -> ppb.GetServerStatusResponse:
        return call(self._stub.GetServerStatus, ppb.GetServerStatusRequest(), timeout=self._timeout_s)
