"""Typed clients of Lepton's services: the base (one reused channel, deadlines, retries) and the
Coordinator's client.

One channel per endpoint, reused for every call; a deadline on every call; grpc errors become
domain errors (lepton.errors) at this boundary; idempotent calls are retried on Unavailable with
jittered exponential backoff. Calls return lepton.domain values; the operator's views (status,
checkpoint manifests, events) come as the contract's messages, which are what they print.

Imports no torch: the calls that carry tensors (assignment, layout, evaluation) load the tensor
codec when first used, so ``lepton status`` and friends start fast.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from lepton.config import JobSpec
from lepton.control_wire import (
    ROLE_TO_WIRE,
    heartbeat_from_proto,
    job_from_proto,
    lease_from_proto,
    member_from_ref,
    member_ref,
    report_to_proto,
    ticket_from_proto,
)
from lepton.domain import CheckpointReport, CheckpointTicket, HeartbeatReply, LeaseGrant, MemberId, Role
from lepton.errors import InvalidArgument, ResourceExhausted, Unavailable
from lepton.heartbeat_stream import BeatStream
from lepton.retry import RetryPolicy, call_with_retry
from lepton.rpc import call, dial, iterate
from lepton.security import INSECURE, Security
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc

if TYPE_CHECKING:
    import torch

    from lepton.tasks import Evaluation
    from lepton.tensors import TensorKind, TensorSpec

DEFAULT_TIMEOUT_S = 10.0
# A call the server's limits refused (RESOURCE_EXHAUSTED) never reached a handler: nothing changed,
# so every control call may be retried after a jittered backoff, even one that is not idempotent.
REFUSED = (ResourceExhausted,)
RETRYABLE = (Unavailable, ResourceExhausted)


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


class ServiceClient:
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
            lambda: call(method, request, timeout=self._timeout_s), self._retry, retry_on=RETRYABLE, rng=self._rng
        )


def instance_name(environ: Mapping[str, str] = os.environ) -> str:
    """Which container or pod this process is, for ``lepton status`` where hostname and pid do not
    tell: $LEPTON_INSTANCE, else $POD_NAME (set from the Kubernetes downward API), else ""."""
    return (environ.get("LEPTON_INSTANCE") or environ.get("POD_NAME") or "").strip()[:253]


def _loss_fields(loss: float | None) -> dict:
    """A report's loss: None (no loss) is sent as loss_unknown."""
    return {"loss_unknown": True} if loss is None else {"loss": loss}


class CoordinatorClient(ServiceClient):
    """Client of one coordinator. Raises lepton.errors on failure."""

    _stub_class = cpb_grpc.CoordinatorStub

    def __init__(self, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self._beats = BeatStream(self._stub, self._timeout_s)
        self._renewals: dict[MemberId, float] = {}
        self._renewals_lock = threading.Lock()

    def close(self) -> None:
        self._beats.close()
        super().close()

    def _renewing(self, member: MemberId, fn):  # type: ignore[no-untyped-def]
        """Runs a call that renews ``member``'s liveness on the coordinator (LeaseShard,
        ReportProgress, CompleteShard); notes when it was sent if it succeeded."""
        sent = time.monotonic()
        result = fn()
        with self._renewals_lock:
            self._renewals[member] = max(sent, self._renewals.get(member, sent))
        return result

    def renewal_sent(self, member: MemberId) -> float | None:
        """When (time.monotonic) the newest call that renewed ``member`` and succeeded was sent."""
        with self._renewals_lock:
            return self._renewals.get(member)

    def register(self, role: Role, address: str = "", member_id: str = "") -> tuple[MemberId, JobSpec]:
        reply = call_with_retry(
            lambda: call(
                self._stub.RegisterMember,
                cpb.RegisterMemberRequest(
                    role=ROLE_TO_WIRE[role],
                    address=address,
                    member_id=member_id,
                    hostname=socket.gethostname(),
                    pid=os.getpid(),
                    instance=instance_name(),
                ),
                timeout=self._timeout_s,
            ),
            self._retry,
            retry_on=RETRYABLE,
            rng=self._rng,
        )
        return member_from_ref(reply.member), job_from_proto(reply.job)

    def heartbeat(
        self,
        member: MemberId,
        version: int = 0,
        roster_version: int = 0,
        checkpoint: CheckpointReport | None = None,
    ) -> HeartbeatReply:
        """Raises InvalidArgument for a job state this version does not know."""
        reply = call(
            self._stub.Heartbeat,
            cpb.HeartbeatRequest(
                member=member_ref(member), version=version, roster_version=roster_version,
                checkpoint=report_to_proto(checkpoint) if checkpoint is not None else None,
            ),
            timeout=self._timeout_s,
        )
        return heartbeat_from_proto(reply)

    def beat(self, member: MemberId) -> HeartbeatReply:
        """A worker's heartbeat over the long-lived HeartbeatStream (lepton.heartbeat_stream);
        raises what ``heartbeat`` raises."""
        return heartbeat_from_proto(self._beats.beat(cpb.HeartbeatRequest(member=member_ref(member))))

    def deregister(self, member: MemberId) -> int:
        reply = call(self._stub.Deregister, cpb.DeregisterRequest(member=member_ref(member)), timeout=self._timeout_s)
        return reply.shards_requeued

    def assignment(self, member: MemberId) -> AssignmentInfo:
        from lepton import codec
        from lepton.wire import MODE_FROM_WIRE, optimizer_kwargs, spec_from_proto

        responses = self._stub.GetAssignment(
            cpb.GetAssignmentRequest(member=member_ref(member)), timeout=self._timeout_s * 6
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
            cpb.ReportReadyRequest(member=member_ref(member), layout_version=layout_version, version=version),
        )

    def layout(self) -> LayoutInfo:
        from lepton.wire import spec_from_proto

        reply = self._idempotent(self._stub.GetLayout, cpb.GetLayoutRequest())
        return LayoutInfo(
            reply.layout_version,
            tuple(
                ServerInfo(s.member_id, s.address, tuple(spec_from_proto(t) for t in s.tensors))
                for s in reply.servers
            ),
        )

    def lease(self, member: MemberId, max_wait_s: float = 0.0) -> LeaseGrant:
        """A lease decision; with ``max_wait_s`` the coordinator may hold a WAIT that long."""
        request = cpb.LeaseShardRequest(member=member_ref(member), max_wait_s=max_wait_s)
        return lease_from_proto(
            call_with_retry(
                lambda: self._renewing(
                    member, lambda: call(self._stub.LeaseShard, request, timeout=self._timeout_s + max_wait_s)
                ),
                self._retry,
                retry_on=RETRYABLE,
                rng=self._rng,
            )
        )

    def progress(
        self, member: MemberId, epoch: int, shard: int, offset: int, loss: float | None, samples: int,
        lease_id: int = 0,
    ) -> None:
        """``loss`` None: the worker has none for these samples."""
        self._renewing(member, lambda: self._idempotent(
            self._stub.ReportProgress,
            cpb.ReportProgressRequest(
                member=member_ref(member), epoch=epoch, shard=shard, offset=offset, samples=samples,
                lease_id=lease_id, **_loss_fields(loss),
            ),
        ))

    def progress_once(
        self, member: MemberId, epoch: int, shard: int, offset: int, loss: float | None, samples: int,
        timeout_s: float = 5.0, lease_id: int = 0,
    ) -> None:
        """One attempt, short deadline: for reporters that retry by sending newer progress."""
        self._renewing(member, lambda: call(
            self._stub.ReportProgress,
            cpb.ReportProgressRequest(
                member=member_ref(member), epoch=epoch, shard=shard, offset=offset, samples=samples,
                lease_id=lease_id, **_loss_fields(loss),
            ),
            timeout=min(timeout_s, self._timeout_s),
        ))

    def complete(
        self, member: MemberId, epoch: int, shard: int, loss: float | None, samples: int, lease_id: int = 0
    ) -> bool:
        """Retried only when the server's limits refused it (RESOURCE_EXHAUSTED: it never ran)."""
        request = cpb.CompleteShardRequest(
            member=member_ref(member), epoch=epoch, shard=shard, samples=samples, lease_id=lease_id,
            **_loss_fields(loss),
        )
        reply = call_with_retry(
            lambda: self._renewing(member, lambda: call(self._stub.CompleteShard, request, timeout=self._timeout_s)),
            self._retry, retry_on=REFUSED, rng=self._rng,
        )
        return reply.epoch_completed

    def report_evaluation(self, member: MemberId, result: Evaluation, model_version: int = 0) -> None:
        from lepton.wire import evaluation_to_fields

        call(
            self._stub.ReportEvaluation,
            cpb.ReportEvaluationRequest(
                member=member_ref(member), model_version=model_version, **evaluation_to_fields(result)
            ),
            timeout=self._timeout_s,
        )

    def status(self) -> cpb.GetStatusResponse:
        """The job as the coordinator sees it, as the contract's message (what operators print)."""
        return self._idempotent(self._stub.GetStatus, cpb.GetStatusRequest())

    def members(self) -> tuple[MemberId, ...]:
        """Every member's latest incarnation, as the coordinator lists them."""
        return tuple(member_from_ref(m.member) for m in self.status().members)

    def decline_evaluation(self, member: MemberId, reason: str = "") -> None:
        """Gives the evaluation back (the coordinator hands it to another worker)."""
        call(
            self._stub.DeclineEvaluation,
            cpb.DeclineEvaluationRequest(member=member_ref(member), reason=reason),
            timeout=self._timeout_s,
        )

    def cancel(self, reason: str) -> None:
        call(self._stub.CancelJob, cpb.CancelJobRequest(reason=reason), timeout=self._timeout_s)

    def report_failure(self, member: MemberId, reason: str) -> None:
        """Ends the job as FAILED with ``reason`` (parameter servers, and the worker asked to
        evaluate); idempotent, so retried."""
        self._idempotent(self._stub.ReportFailure, cpb.ReportFailureRequest(member=member_ref(member), reason=reason))

    def request_checkpoint(self, reason: str = "") -> CheckpointTicket:
        """One attempt (a retry after the checkpoint completed would start another one)."""
        return ticket_from_proto(
            call(self._stub.RequestCheckpoint, cpb.RequestCheckpointRequest(reason=reason), timeout=self._timeout_s)
        )

    def checkpoint(self, checkpoint_id: str = "") -> cpb.CheckpointManifest:
        """The named checkpoint's manifest, or the newest complete one ("")."""
        reply = self._idempotent(self._stub.GetCheckpoint, cpb.GetCheckpointRequest(checkpoint_id=checkpoint_id))
        return reply.checkpoint

    def watch(self, after_sequence: int = 0, timeout_s: float | None = None) -> Iterator[cpb.JobEvent]:
        return iterate(
            self._stub.WatchJob(cpb.WatchJobRequest(after_sequence=after_sequence), timeout=timeout_s)
        )


