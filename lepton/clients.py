"""Typed clients of the Coordinator and ParameterServer services.

One channel per endpoint, reused for every call; a deadline on every call; grpc errors become
domain errors (lepton.errors) at this boundary; idempotent calls are retried on Unavailable with
jittered exponential backoff.
"""

from __future__ import annotations

import os
import random
import socket
import uuid
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import torch

from lepton import codec
from lepton.codec import TensorSpec
from lepton.tensors import TensorKind
from lepton.config import JobSpec
from lepton.errors import InvalidArgument
from lepton.retry import RetryPolicy, call_with_retry
from lepton.rpc import call, dial, iterate
from lepton.security import INSECURE, Security
from lepton.tasks import Evaluation
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from lepton.wire import MODE_FROM_WIRE, evaluation_to_fields, job_from_proto, optimizer_kwargs, spec_from_proto

DEFAULT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class MemberId:
    member_id: str
    incarnation: int

    def to_proto(self) -> common.MemberRef:
        return common.MemberRef(member_id=self.member_id, incarnation=self.incarnation)

    def __str__(self) -> str:
        return f"{self.member_id}/{self.incarnation}"


@dataclass(frozen=True)
class ServerInfo:
    member_id: str
    address: str
    tensors: tuple[TensorSpec, ...]


@dataclass(frozen=True)
class LayoutInfo:
    version: int
    servers: tuple[ServerInfo, ...]


@dataclass(frozen=True)
class AssignmentInfo:
    layout_version: int
    tensors: dict[str, torch.Tensor]
    optimizer: str
    lr: float
    optimizer_kwargs: dict
    mode: str
    sparse: frozenset[str] = frozenset()  # row-sparse tensors (TensorInfo.sparse)
    kinds: dict[str, TensorKind] = field(default_factory=dict)  # TensorInfo.kind; absent: a parameter


class _Client:
    """One reused channel to ``address``, its stub, a deadline and a retry policy."""

    _stub_class: type

    def __init__(
        self,
        address: str,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        retry: RetryPolicy | None = None,
        security: Security = INSECURE,
    ) -> None:
        self.address = address
        self._channel = dial(address, security)
        self._stub = self._stub_class(self._channel)
        self._timeout_s = timeout_s
        self._retry = retry or RetryPolicy()
        self._rng = random.Random()

    def close(self) -> None:
        self._channel.close()

    def _idempotent(self, method, request):
        return call_with_retry(
            lambda: call(method, request, timeout=self._timeout_s), self._retry, rng=self._rng
        )


class CoordinatorClient(_Client):
    """Client of one coordinator. Raises lepton.errors on failure."""

    _stub_class = cpb_grpc.CoordinatorStub

    def register(self, role: int, address: str = "", member_id: str = "") -> tuple[MemberId, JobSpec]:
        reply = call_with_retry(
            lambda: call(
                self._stub.RegisterMember,
                cpb.RegisterMemberRequest(
                    role=role,
                    address=address,
                    member_id=member_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                ),
                timeout=self._timeout_s,
            ),
            self._retry,
            rng=self._rng,
        )
        return MemberId(reply.member.member_id, reply.member.incarnation), job_from_proto(reply.job)

    def heartbeat(
        self,
        member: MemberId,
        version: int = 0,
        roster_version: int = 0,
        checkpoint: cpb.CheckpointReport | None = None,
    ) -> cpb.HeartbeatResponse:
        return call(
            self._stub.Heartbeat,
            cpb.HeartbeatRequest(
                member=member.to_proto(), version=version, roster_version=roster_version, checkpoint=checkpoint
            ),
            timeout=self._timeout_s,
        )

    def deregister(self, member: MemberId) -> int:
        reply = call(self._stub.Deregister, cpb.DeregisterRequest(member=member.to_proto()), timeout=self._timeout_s)
        return reply.shards_requeued

    def assignment(self, member: MemberId) -> AssignmentInfo:
        responses = self._stub.GetAssignment(
            cpb.GetAssignmentRequest(member=member.to_proto()), timeout=self._timeout_s * 6
        )
        head: cpb.GetAssignmentResponse | None = None
        assembler: codec.TensorAssembler | None = None
        for msg in iterate(responses, self._timeout_s * 6):
            if head is None:
                head = msg
                specs = {t.name: spec_from_proto(t) for t in msg.tensors}
                assembler = codec.TensorAssembler(specs)
            for chunk in msg.chunks:
                assembler.add(chunk)  # type: ignore[union-attr]
        if head is None or assembler is None:
            raise InvalidArgument("empty assignment stream")
        tensors = assembler.finish(require=[t.name for t in head.tensors])
        return AssignmentInfo(
            layout_version=head.layout_version,
            tensors=tensors,
            optimizer=head.optimizer.name,
            lr=head.optimizer.learning_rate,
            optimizer_kwargs=optimizer_kwargs(head.optimizer),
            mode=MODE_FROM_WIRE[head.mode],
            sparse=frozenset(t.name for t in head.tensors if t.sparse),
            kinds={t.name: spec_from_proto(t).kind for t in head.tensors},
        )

    def report_ready(self, member: MemberId, layout_version: int, version: int = 0) -> None:
        self._idempotent(
            self._stub.ReportReady,
            cpb.ReportReadyRequest(member=member.to_proto(), layout_version=layout_version, version=version),
        )

    def layout(self) -> LayoutInfo:
        reply = self._idempotent(self._stub.GetLayout, cpb.GetLayoutRequest())
        return LayoutInfo(
            reply.layout_version,
            tuple(
                ServerInfo(s.member_id, s.address, tuple(spec_from_proto(t) for t in s.tensors))
                for s in reply.servers
            ),
        )

    def lease(self, member: MemberId, max_wait_s: float = 0.0) -> cpb.LeaseShardResponse:
        """A lease decision; with ``max_wait_s`` the coordinator may hold a WAIT that long."""
        request = cpb.LeaseShardRequest(member=member.to_proto(), max_wait_s=max_wait_s)
        return call_with_retry(
            lambda: call(self._stub.LeaseShard, request, timeout=self._timeout_s + max_wait_s), self._retry, rng=self._rng
        )

    def progress(
        self, member: MemberId, epoch: int, shard: int, offset: int, loss: float, samples: int, lease_id: int = 0
    ) -> None:
        self._idempotent(
            self._stub.ReportProgress,
            cpb.ReportProgressRequest(
                member=member.to_proto(), epoch=epoch, shard=shard, offset=offset, loss=loss, samples=samples,
                lease_id=lease_id,
            ),
        )

    def progress_once(
        self, member: MemberId, epoch: int, shard: int, offset: int, loss: float, samples: int,
        timeout_s: float = 5.0, lease_id: int = 0,
    ) -> None:
        """One attempt, short deadline: for reporters that retry by sending newer progress."""
        call(
            self._stub.ReportProgress,
            cpb.ReportProgressRequest(
                member=member.to_proto(), epoch=epoch, shard=shard, offset=offset, loss=loss, samples=samples,
                lease_id=lease_id,
            ),
            timeout=min(timeout_s, self._timeout_s),
        )

    def complete(
        self, member: MemberId, epoch: int, shard: int, loss: float, samples: int, lease_id: int = 0
    ) -> bool:
        reply = call(
            self._stub.CompleteShard,
            cpb.CompleteShardRequest(
                member=member.to_proto(), epoch=epoch, shard=shard, loss=loss, samples=samples, lease_id=lease_id
            ),
            timeout=self._timeout_s,
        )
        return reply.epoch_completed

    def report_evaluation(self, member: MemberId, result: Evaluation) -> None:
        call(
            self._stub.ReportEvaluation,
            cpb.ReportEvaluationRequest(member=member.to_proto(), **evaluation_to_fields(result)),
            timeout=self._timeout_s,
        )

    def status(self) -> cpb.GetStatusResponse:
        return self._idempotent(self._stub.GetStatus, cpb.GetStatusRequest())

    def cancel(self, reason: str) -> None:
        call(self._stub.CancelJob, cpb.CancelJobRequest(reason=reason), timeout=self._timeout_s)

    def report_failure(self, member: MemberId, reason: str) -> None:
        """Ends the job as FAILED with ``reason`` (parameter servers); idempotent, so retried."""
        self._idempotent(self._stub.ReportFailure, cpb.ReportFailureRequest(member=member.to_proto(), reason=reason))

    def request_checkpoint(self, reason: str = "") -> cpb.RequestCheckpointResponse:
        """One attempt (a retry after the checkpoint completed would start another one)."""
        return call(
            self._stub.RequestCheckpoint, cpb.RequestCheckpointRequest(reason=reason), timeout=self._timeout_s
        )

    def checkpoint(self, checkpoint_id: str = "") -> cpb.CheckpointManifest:
        """The named checkpoint's manifest, or the newest complete one ("")."""
        reply = self._idempotent(self._stub.GetCheckpoint, cpb.GetCheckpointRequest(checkpoint_id=checkpoint_id))
        return reply.checkpoint

    def watch(self, after_sequence: int = 0, timeout_s: float | None = None) -> Iterator[cpb.JobEvent]:
        return iterate(
            self._stub.WatchJob(cpb.WatchJobRequest(after_sequence=after_sequence), timeout=timeout_s)
        )


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
        member=member.to_proto(),
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


class ParameterClient(_Client):
    """Client of one parameter server. Raises lepton.errors on failure."""

    _stub_class = ppb_grpc.ParameterServerStub

    def pull(
        self, member: MemberId, names: Iterable[str] = (), rows: Mapping[str, torch.Tensor] | None = None
    ) -> tuple[int, dict[str, torch.Tensor]]:
        """Whole tensors ``names`` (everything when both are empty) and, of each tensor in ``rows``,
        only those rows (shape [len(rows), ...], in that order)."""
        request = ppb.PullRequest(
            member=member.to_proto(),
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
            ppb.JoinStepsRequest(member=member.to_proto(), from_version=from_version),
            timeout=self._timeout_s if timeout_s is None else timeout_s,
        )
        return reply.joined, reply.version

    def leave_steps(self, member: MemberId) -> None:
        self._idempotent(self._stub.LeaveSteps, ppb.LeaveStepsRequest(member=member.to_proto()))

    def server_status(self) -> ppb.GetServerStatusResponse:
        return call(self._stub.GetServerStatus, ppb.GetServerStatusRequest(), timeout=self._timeout_s)
