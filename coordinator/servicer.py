"""The Coordinator gRPC service: decode, one call on the Job, encode."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import cast

from coordinator.checkpoints import Checkpoint
from coordinator.events import Event
from coordinator.job import Job, JobState, JobStatus, LeaseOutcome
from coordinator.ledger import Lease
from coordinator.validation import ValidationRecord
from lepton import codec
from lepton.control_wire import ROLE_FROM_WIRE, ROLE_TO_WIRE, heartbeat_to_proto, report_from_proto
from lepton.domain import CheckpointReport
from lepton.errors import InvalidArgument
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as pb
from lepton.v1 import coordinator_pb2_grpc as pb_grpc
from lepton.wire import (
    evaluation_from_proto,
    evaluation_to_fields,
    job_to_proto,
    spec_to_proto,
    validation_to_proto,
)

_LEASE_TO_WIRE = {
    LeaseOutcome.GRANTED: pb.LEASE_OUTCOME_GRANTED,
    LeaseOutcome.WAIT: pb.LEASE_OUTCOME_WAIT,
    LeaseOutcome.EVALUATE: pb.LEASE_OUTCOME_EVALUATE,
    LeaseOutcome.JOB_DONE: pb.LEASE_OUTCOME_JOB_DONE,
}
WATCH_POLL_S = 0.5


def _member(ref: common.MemberRef) -> tuple[str, int]:
    if not ref.member_id:
        raise InvalidArgument("member.member_id is required")
    if ref.incarnation < 1:
        raise InvalidArgument("member.incarnation must be >= 1")
    return ref.member_id, ref.incarnation


def _lease_id(value: int) -> int:
    if value < 0:
        raise InvalidArgument(f"lease_id must be >= 0 (0: unspecified), got {value}")
    return value


def _lease(lease: Lease) -> pb.ShardLease:
    return pb.ShardLease(
        epoch=lease.epoch,
        shard=lease.shard.index,
        start=lease.shard.start,
        end=lease.shard.end,
        offset=lease.offset,
        lease_id=lease.lease_id,
    )


def checkpoint_to_proto(checkpoint: Checkpoint) -> pb.CheckpointManifest:
    state = (
        pb.CHECKPOINT_STATE_FAILED
        if checkpoint.error
        else pb.CHECKPOINT_STATE_COMPLETE if checkpoint.complete else pb.CHECKPOINT_STATE_PENDING
    )
    return pb.CheckpointManifest(
        checkpoint_id=checkpoint.checkpoint_id,
        state=state,
        reason=checkpoint.reason,
        servers=[
            pb.ServerCheckpoint(
                member_id=r.member_id, version=r.version, path=r.path, tensors=checkpoint.tensors.get(r.member_id, ())
            )
            for r in checkpoint.reports.values()
        ],
        target_version=checkpoint.target_version,
        consistent=checkpoint.consistent,
        final=checkpoint.final,
        error=checkpoint.error,
        requested_unix_s=checkpoint.requested_unix_s,
        completed_unix_s=checkpoint.completed_unix_s,
        completed_after_s=checkpoint.completed_after_s,
        manifest_path=checkpoint.manifest_path,
    )


def _checkpoint_report(request: pb.HeartbeatRequest) -> CheckpointReport | None:
    if not request.HasField("checkpoint"):
        return None
    return report_from_proto(request.checkpoint)


def status_to_proto(status: JobStatus) -> pb.GetStatusResponse:
    msg = pb.GetStatusResponse(
        job=job_to_proto(status.spec),
        state=cast(pb.JobState, status.state.value),  # domain values are the wire numbers
        epoch=status.epoch,
        shards_completed_in_epoch=status.shards_completed_in_epoch,
        shards_leased=status.shards_leased,
        shards_pending=status.shards_pending,
        shard_completions=status.shard_completions,
        duplicate_completions_rejected=status.duplicate_completions_rejected,
        reassignments=status.reassignments,
        members_declared_dead=status.members_declared_dead,
        samples_trained=status.samples_trained,
        samples_per_second=status.samples_per_second,
        recent_loss=status.recent_loss,
        training_seconds=status.training_seconds,
        layout_version=status.layout_version,
        failure=status.failure,
        ps_restarts=status.ps_restarts,
        steps_rolled_back=status.steps_rolled_back,
        quarantined_shards=list(status.quarantined_shards),
        leases_expired=status.leases_expired,
    )
    if status.last_checkpoint is not None:
        msg.last_checkpoint.CopyFrom(checkpoint_to_proto(status.last_checkpoint))
    for snap in status.members:
        m = snap.member
        entry = msg.members.add(
            member=common.MemberRef(member_id=m.member_id, incarnation=m.incarnation),
            role=ROLE_TO_WIRE[m.role],
            address=m.address,
            alive=snap.alive,
            last_heartbeat_age_s=snap.heartbeat_age_s,
            hostname=m.hostname,
            pid=m.pid,
            instance=m.instance,
        )
        if snap.lease is not None:
            entry.lease.CopyFrom(_lease(snap.lease))
            entry.has_lease = True
    if status.evaluation is not None:
        e = status.evaluation
        msg.has_evaluation = True
        msg.evaluation.CopyFrom(pb.EvaluationResult(**evaluation_to_fields(e)))
    msg.validation.extend(validation_to_proto(row) for row in status.validation)
    msg.stopped_early = status.stopped_early
    return msg


def event_to_proto(event: Event) -> pb.JobEvent:
    msg = pb.JobEvent(
        sequence=event.sequence,
        time_unix_s=event.time_unix_s,
        kind=cast(pb.EventKind, event.kind.value),
        member=common.MemberRef(member_id=event.member_id, incarnation=event.incarnation),
        epoch=event.epoch,
        shard=event.shard,
        offset=event.offset,
        job_state=cast(pb.JobState, JobState[event.job_state].value if event.job_state else 0),
        loss=event.loss,
        message=event.message,
    )
    if "validation" in event.extra:
        msg.validation.CopyFrom(validation_to_proto(ValidationRecord.from_state(event.extra["validation"])))
    return msg


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    """Adapter from the Coordinator service to a Job. ``clock`` returns monotonic seconds."""

    def __init__(self, job: Job, clock: Callable[[], float]) -> None:
        self._job = job
        self._now = clock

    def RegisterMember(self, request, context):
        role = ROLE_FROM_WIRE.get(request.role)
        if role is None:
            raise InvalidArgument("role must be ROLE_PARAMETER_SERVER or ROLE_WORKER")
        member = self._job.register(
            role, request.address, self._now(), request.member_id, request.hostname, request.pid,
            request.instance,
        )
        return pb.RegisterMemberResponse(
            member=common.MemberRef(member_id=member.member_id, incarnation=member.incarnation),
            job=job_to_proto(self._job.spec),
        )

    def Heartbeat(self, request, context):
        reply = self._job.heartbeat(
            *_member(request.member), self._now(), request.version, request.roster_version, _checkpoint_report(request)
        )
        return heartbeat_to_proto(reply)

    def HeartbeatStream(self, request_iterator, context) -> Iterator[pb.HeartbeatStreamResponse]:
        beats = 0
        for request in request_iterator:
            if not request.HasField("heartbeat"):
                raise InvalidArgument("heartbeat is required in every HeartbeatStreamRequest")
            yield pb.HeartbeatStreamResponse(heartbeat=self.Heartbeat(request.heartbeat, context))
            beats += 1
        if not beats:
            raise InvalidArgument("a HeartbeatStream carries at least one HeartbeatStreamRequest")

    def Deregister(self, request, context):
        moved = self._job.deregister(*_member(request.member), self._now())
        return pb.DeregisterResponse(shards_requeued=moved)

    def GetAssignment(self, request, context) -> Iterator[pb.GetAssignmentResponse]:
        assignment = self._job.assignment(*_member(request.member))
        yield pb.GetAssignmentResponse(
            layout_version=assignment.layout_version,
            tensors=[spec_to_proto(s) for s in assignment.tensors],
            optimizer=job_to_proto(self._job.spec).optimizer,
            mode=job_to_proto(self._job.spec).mode,
        )
        for chunks in codec.pack(assignment.values.items()):
            yield pb.GetAssignmentResponse(chunks=chunks)

    def ReportReady(self, request, context):
        self._job.ready(*_member(request.member), request.layout_version, self._now(), request.version)
        return pb.ReportReadyResponse()

    def GetLayout(self, request, context):
        layout, addresses = self._job.layout()
        return pb.GetLayoutResponse(
            layout_version=layout.version,
            servers=[
                pb.ServerAssignment(
                    member_id=server,
                    address=addresses[server],
                    tensors=[spec_to_proto(s) for s in layout.tensors_of(server)],
                )
                for server in layout.servers
            ],
        )

    def LeaseShard(self, request, context):
        decision = self._job.lease(*_member(request.member), self._now(), request.max_wait_s, self._now)
        msg = pb.LeaseShardResponse(
            outcome=_LEASE_TO_WIRE[decision.outcome], retry_after_s=decision.retry_after_s
        )
        if decision.lease is not None:
            msg.lease.CopyFrom(_lease(decision.lease))
            msg.lease_timeout_s = self._job.spec.lease_timeout_s
        return msg

    def ReportProgress(self, request, context):
        self._job.progress(
            *_member(request.member),
            request.epoch,
            request.shard,
            request.offset,
            None if request.loss_unknown else request.loss,
            request.samples,
            self._now(),
            _lease_id(request.lease_id),
        )
        return pb.ReportProgressResponse()

    def CompleteShard(self, request, context):
        done = self._job.complete(
            *_member(request.member),
            request.epoch,
            request.shard,
            None if request.loss_unknown else request.loss,
            request.samples,
            self._now(),
            _lease_id(request.lease_id),
        )
        return pb.CompleteShardResponse(epoch_completed=done)

    def ReportEvaluation(self, request, context):
        self._job.report_evaluation(
            *_member(request.member), evaluation_from_proto(request), self._now(), request.model_version
        )
        return pb.ReportEvaluationResponse()

    def DeclineEvaluation(self, request, context):
        self._job.decline_evaluation(*_member(request.member), request.reason, self._now())
        return pb.DeclineEvaluationResponse()

    def CancelJob(self, request, context):
        return pb.CancelJobResponse(state=self._job.cancel(request.reason, self._now()).value)

    def ReportFailure(self, request, context):
        state = self._job.report_failure(*_member(request.member), request.reason, self._now())
        return pb.ReportFailureResponse(state=state.value)

    def RequestCheckpoint(self, request, context):
        checkpoint, new = self._job.request_checkpoint(request.reason, self._now())
        return pb.RequestCheckpointResponse(
            checkpoint_id=checkpoint.checkpoint_id, coalesced=not new, target_version=checkpoint.target_version
        )

    def GetCheckpoint(self, request, context):
        return pb.GetCheckpointResponse(checkpoint=checkpoint_to_proto(self._job.checkpoint(request.checkpoint_id)))

    def GetStatus(self, request, context):
        return status_to_proto(self._job.status(self._now()))

    def WatchJob(self, request, context) -> Iterator[pb.JobEvent]:
        if request.after_sequence < 0:
            raise InvalidArgument(
                f"after_sequence must be >= 0 (0: from the oldest event), got {request.after_sequence}"
            )
        sequence = request.after_sequence
        events = self._job.events
        while context.is_active() and not events.closed:
            for event in events.wait_after(sequence, WATCH_POLL_S):
                yield event_to_proto(event)
                sequence = event.sequence


def registration(servicer: CoordinatorServicer):
    """What lepton.rpc.Server needs to host this service."""
    return (
        pb_grpc.add_CoordinatorServicer_to_server,
        servicer,
        pb.DESCRIPTOR.services_by_name["Coordinator"].full_name,
    )
