"""Typed client of the ParameterServer service, and the Coordinator's client (from
lepton.coordinator_client, which operator commands import without torch) re-exported.

Same rules as every client: one reused channel, a deadline on every call, lepton.errors at this
boundary, idempotent calls retried on Unavailable.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from lepton import codec
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
from lepton.errors import InvalidArgument
from lepton.retry import call_with_retry
from lepton.rpc import call, iterate
from lepton.v1 import common_pb2 as common
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc


@dataclass(frozen=True)
class PushReply:
    applied: bool
    version: int
    staleness: int


def new_request_id() -> str:
    return uuid.uuid4().hex


def _push_messages(
    member: MemberId,
    base_version: int,
    samples: int,
    grads: Iterable[tuple[str, torch.Tensor]],
    request_id: str = "",
) -> Iterator[ppb.PushRequest]:
    """A sparse COO gradient (row-sparse, e.g. from ``nn.Embedding(sparse=True)``) travels as its
    rows: a RowSelection in the header and the rows' data under the tensor's name."""
    dense: list[tuple[str, torch.Tensor]] = []
    selections = []
    for name, g in grads:
        if g.is_sparse:
            rows, values = codec.sparse_to_rows(g)
            selections.append(common.RowSelection(name=name, rows=rows.tolist()))
            dense.append((name, values))
        else:
            dense.append((name, g))
    header = ppb.PushHeader(
        member=member_ref(member),
        base_version=base_version,
        sample_count=samples,
        request_id=request_id or new_request_id(),
        rows=selections,
        tensors=len(dense),
    )
    first = True
    for chunks in codec.pack(dense):
        yield ppb.PushRequest(header=header, chunks=chunks) if first else ppb.PushRequest(chunks=chunks)
        first = False
    if first:
        yield ppb.PushRequest(header=header)


def _read_pull(
    responses: Iterator[ppb.PullResponse], timeout_s: float
) -> tuple[int, dict[str, torch.Tensor], ppb.PushResponse | None]:
    assembler = codec.TensorAssembler()
    version = -1
    push = None
    for msg in iterate(responses, timeout_s):
        if version < 0:
            version = msg.version
            push = msg.push if msg.HasField("push") else None
        for chunk in msg.chunks:
            assembler.add(chunk)
    return version, assembler.finish(), push


class ParameterClient(ServiceClient):
    """Client of one parameter server. Raises lepton.errors on failure."""

    _stub_class = ppb_grpc.ParameterServerStub

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

        def once():
            version, tensors, _ = _read_pull(self._stub.Pull(request, timeout=self._timeout_s), self._timeout_s)
            return version, tensors

        return call_with_retry(once, self._retry, rng=self._rng)

    def push_pull(
        self,
        member: MemberId,
        base_version: int,
        samples: int,
        grads: Mapping[str, torch.Tensor],
        timeout_s: float | None = None,
        request_id: str = "",
    ) -> tuple[PushReply, int, dict[str, torch.Tensor]]:
        """Not retried here. To retry safely, call again with the same ``request_id``: the server
        applies a push at most once and answers a retry with the original outcome."""
        timeout_s = self._timeout_s if timeout_s is None else timeout_s
        responses = self._stub.PushPull(
            _push_messages(member, base_version, samples, grads.items(), request_id), timeout=timeout_s
        )
        version, tensors, push = _read_pull(responses, timeout_s)
        if push is None:
            raise InvalidArgument(f"{self.address} answered PushPull without the push outcome")
        reply = PushReply(push.outcome == ppb.PUSH_OUTCOME_APPLIED, push.version, push.staleness)
        return reply, version, tensors

    def push(
        self, member: MemberId, base_version: int, samples: int, grads: Mapping[str, torch.Tensor],
        timeout_s: float | None = None, request_id: str = "",
    ) -> PushReply:
        reply = call(
            self._stub.Push,
            _push_messages(member, base_version, samples, grads.items(), request_id),
            timeout=self._timeout_s if timeout_s is None else timeout_s,
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
