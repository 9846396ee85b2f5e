"""The control plane's values as every role sees them: roles, job states, leases, heartbeats and
checkpoint orders and reports.

The coordinator's domain works with these, and the typed clients (lepton.coordinator_client) return
them, so no agent outside a servicer or codec handles a generated message. The enums that have a
counterpart in the contract carry its numbers. Imports neither grpc nor torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, IntEnum

from lepton.errors import InvalidArgument

CHECKPOINT_ID = re.compile(r"^ckpt-(\d{6,})$")


class Role(Enum):
    PARAMETER_SERVER = "ps"
    WORKER = "worker"


class JobState(IntEnum):
    WAITING_FOR_SERVERS = 1
    INITIALIZING = 2
    TRAINING = 3
    EVALUATING = 4
    SUCCEEDED = 5
    FAILED = 6

    @property
    def terminal(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED)


class LeaseOutcome(IntEnum):
    GRANTED = 1  # the lease is filled: train it from lease.offset
    WAIT = 2  # nothing to do now: ask again after retry_after_s
    EVALUATE = 3  # pull the final parameters, evaluate, report the evaluation
    JOB_DONE = 4  # the job is over


@dataclass(frozen=True)
class MemberId:
    """One incarnation of a member: registering again under the same id fences the earlier ones."""

    member_id: str
    incarnation: int

    def __str__(self) -> str:
        return f"{self.member_id}/{self.incarnation}"


@dataclass(frozen=True)
class WorkerView:
    """A worker as the parameter servers' roster needs it."""

    member_id: str
    incarnation: int
    alive: bool


@dataclass(frozen=True)
class CheckpointOrder:
    """What a server is asked to do (sent in its heartbeat replies while the checkpoint is pending)."""

    checkpoint_id: str
    target_version: int  # 0: snapshot the version you have when you see the order


def parse_checkpoint_id(checkpoint_id: str) -> str:
    """Raises InvalidArgument unless ``checkpoint_id`` looks like one a coordinator hands out."""
    if not CHECKPOINT_ID.match(checkpoint_id):
        raise InvalidArgument(f"checkpoint_id must look like ckpt-000001, got {checkpoint_id[:40]!r}")
    return checkpoint_id


@dataclass(frozen=True)
class CheckpointReport:
    """A server's answer to an order: the file it wrote at ``version``, or that it was past the
    target already (``missed``), or why it could not write one (``error``)."""

    checkpoint_id: str
    target_version: int
    version: int
    path: str = ""
    missed: bool = False
    error: str = ""

    def check(self) -> None:
        """Raises InvalidArgument for a malformed report."""
        parse_checkpoint_id(self.checkpoint_id)
        if self.version < 0 or self.target_version < 0:
            raise InvalidArgument("checkpoint version and target_version must be >= 0")
        if not (self.missed or self.error or self.path):
            raise InvalidArgument("a checkpoint report needs a path, missed or an error")


@dataclass(frozen=True)
class HeartbeatReply:
    state: JobState
    layout_version: int
    workers: tuple[WorkerView, ...] = ()
    roster_version: int = 0  # servers echo it in their next heartbeat once they applied ``workers``
    checkpoint: CheckpointOrder | None = None  # parameter servers: a checkpoint to take
    interval_s: float = 0.0  # workers: beat this often from now on (0: the job's heartbeat_interval_s)


@dataclass(frozen=True)
class ShardLease:
    """Samples [start, end) of one shard of one epoch, to train from ``offset`` on."""

    lease_id: int
    epoch: int
    shard: int
    start: int
    end: int
    offset: int


@dataclass(frozen=True)
class LeaseGrant:
    """The coordinator's answer to a lease request; ``lease`` only when GRANTED."""

    outcome: LeaseOutcome
    lease: ShardLease | None = None
    retry_after_s: float = 0.0
    lease_timeout_s: float = 0.0  # how long the lease lives without renewal (0: not said)


@dataclass(frozen=True)
class CheckpointTicket:
    """The answer to a checkpoint request: the pending checkpoint's id, and whether one was already
    pending (``coalesced``)."""

    checkpoint_id: str
    coalesced: bool
    target_version: int
