"""The checkpoint manifest: which coordinated checkpoints were asked for, what each parameter server
wrote for them, and which are complete (pure bookkeeping; every decision takes ``now``); and
``JobCheckpoints``, the job's side: events and the published manifests.

How a checkpoint is cut (one request is pending at a time; a second request while one is pending
gets the pending one's id):

- ``sync``: every server snapshots at the same *target version* T (the same global step: in sync
  mode a server's version is the number of steps it applied, and no two servers are more than one
  step apart). T is the newest version servers reported plus a lead of a few heartbeats' worth of
  steps, so each server sees the order before it gets there and captures its state when its
  version becomes T. A server that is already past T reports a miss and the checkpoint is
  retargeted further ahead, with twice the lead. While no worker trains (nothing can move the
  versions) T is "now".
- ``async`` and ``ssp``: each server snapshots the version it has when the order reaches it (T is
  "now"); the manifest records every server's version. This is a per-server snapshot, not a global
  cut: updates keep arriving between the servers' snapshots.
- Once training is over (evaluating or finished), or when a checkpoint has been pending for
  ``stall_s``, T becomes "now": the servers no longer move (or one will never reach T), so they
  snapshot what they have. ``consistent`` says whether the versions of a complete checkpoint are
  all equal in sync mode (a global cut).

A checkpoint is complete when every server of the layout has reported its file; a server that
cannot write one (no state directory) fails it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from coordinator.events import EventKind, EventLog
from coordinator.layout import Layout
from coordinator.statedb import JobStore
from lepton.config import JobSpec
from lepton.domain import CheckpointOrder, CheckpointReport
from lepton.domain import parse_checkpoint_id as parse_id
from lepton.errors import InvalidArgument, NotFound
from lepton.tensors import TensorSpec

NOW = 0  # target version meaning "the version you have when you see the order"
MIN_LEAD_STEPS = 4
LEAD_HEARTBEATS = 3  # lead = steps the fastest server makes in this many heartbeat intervals
MAX_REASON_CHARS = 200


@dataclass(frozen=True)
class ServerCheckpoint:
    """What one server wrote for a checkpoint."""

    member_id: str
    version: int
    path: str


@dataclass
class Checkpoint:
    """One coordinated checkpoint. ``servers`` are the layout's servers when it was requested."""

    checkpoint_id: str
    reason: str
    mode: str
    servers: tuple[str, ...]
    target_version: int
    lead_steps: int
    requested_at: float
    requested_unix_s: float
    final: bool = False
    tensors: dict[str, tuple[str, ...]] = field(default_factory=dict)  # server -> tensor names
    reports: dict[str, ServerCheckpoint] = field(default_factory=dict)
    error: str = ""
    completed_unix_s: float = 0.0
    completed_after_s: float = 0.0
    manifest_path: str = ""  # where the coordinator published the JSON manifest (with --state-dir)

    @property
    def complete(self) -> bool:
        return not self.error and set(self.reports) >= set(self.servers)

    @property
    def pending(self) -> bool:
        return not self.error and not self.complete

    @property
    def consistent(self) -> bool:
        """A complete sync checkpoint whose servers are all at the same version."""
        return self.complete and self.mode == "sync" and len({r.version for r in self.reports.values()}) == 1

    @property
    def sequence(self) -> int:
        return int(self.checkpoint_id.removeprefix("ckpt-"))

    def to_state(self) -> dict:
        return {
            "checkpoint_id": self.checkpoint_id,
            "reason": self.reason,
            "mode": self.mode,
            "servers": list(self.servers),
            "target_version": self.target_version,
            "lead_steps": self.lead_steps,
            "requested_unix_s": self.requested_unix_s,
            "final": self.final,
            "tensors": {s: list(names) for s, names in self.tensors.items()},
            "reports": {m: {"version": r.version, "path": r.path} for m, r in self.reports.items()},
            "error": self.error,
            "completed_unix_s": self.completed_unix_s,
            "completed_after_s": self.completed_after_s,
            "manifest_path": self.manifest_path,
        }

    @classmethod
    def from_state(cls, state: Mapping, now: float) -> Checkpoint:
        return cls(
            checkpoint_id=state["checkpoint_id"],
            reason=state["reason"],
            mode=state["mode"],
            servers=tuple(state["servers"]),
            target_version=state["target_version"],
            lead_steps=state["lead_steps"],
            requested_at=now,  # monotonic time does not survive a restart: the stall clock restarts
            requested_unix_s=state["requested_unix_s"],
            final=state["final"],
            tensors={s: tuple(names) for s, names in state["tensors"].items()},
            reports={m: ServerCheckpoint(m, r["version"], r["path"]) for m, r in state["reports"].items()},
            error=state["error"],
            completed_unix_s=state["completed_unix_s"],
            completed_after_s=state["completed_after_s"],
            manifest_path=state["manifest_path"],
        )


class CheckpointManifest:
    """Every coordinated checkpoint of one job, by id. Not thread-safe: the Job's lock guards it.

    Raises InvalidArgument (malformed id or reason) and NotFound (unknown id, nothing complete).
    """

    def __init__(self, mode: str, heartbeat_interval_s: float, stall_s: float | None = None) -> None:
        self.mode = mode
        self.heartbeat_interval_s = heartbeat_interval_s
        self.stall_s = stall_s if stall_s is not None else max(10.0, 20 * heartbeat_interval_s)
        self._checkpoints: dict[str, Checkpoint] = {}
        self._next = 1
        self._seen: dict[str, tuple[int, float]] = {}  # server -> (version, at) of its last heartbeat
        self._rate: dict[str, float] = {}  # server -> versions per second between its last heartbeats

    # --- observing -----------------------------------------------------------------------------

    def observe(self, server: str, version: int, now: float) -> None:
        """A server's heartbeat reported ``version``: keeps its rate of steps for the lead."""
        previous = self._seen.get(server)
        if previous is not None and now > previous[1] and version >= previous[0]:
            self._rate[server] = (version - previous[0]) / (now - previous[1])
        self._seen[server] = (version, now)

    def _lead(self) -> int:
        rate = max(self._rate.values(), default=0.0)
        return max(MIN_LEAD_STEPS, math.ceil(rate * LEAD_HEARTBEATS * self.heartbeat_interval_s))

    # --- deciding ------------------------------------------------------------------------------

    def request(
        self,
        tensors: Mapping[str, Sequence[str]],
        versions: Mapping[str, int],
        training: bool,
        now: float,
        unix_s: float,
        reason: str = "",
        final: bool = False,
    ) -> tuple[Checkpoint, bool]:
        """Opens a checkpoint of the servers in ``tensors`` (server -> the tensor names it holds), or
        returns the pending one; returns it and whether it is new. ``training``: whether workers may
        still move the versions (sync picks a target ahead of them)."""
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidArgument(f"reason is {len(reason)} characters; at most {MAX_REASON_CHARS}")
        pending = self.pending()
        if pending is not None:
            if final:
                pending.final = True
            return pending, False
        servers = tuple(tensors)
        target, lead = NOW, 0
        if self.mode == "sync" and training:
            lead = self._lead()
            target = max((versions.get(s, 0) for s in servers), default=0) + lead
        checkpoint = Checkpoint(
            checkpoint_id=f"ckpt-{self._next:06d}",
            reason=reason,
            mode=self.mode,
            servers=servers,
            target_version=target,
            lead_steps=lead,
            requested_at=now,
            requested_unix_s=unix_s,
            final=final,
            tensors={s: tuple(names) for s, names in tensors.items()},
        )
        self._next += 1
        self._checkpoints[checkpoint.checkpoint_id] = checkpoint
        return checkpoint, True

    def order(self, training: bool, now: float) -> CheckpointOrder | None:
        """What servers are asked to do now (None: nothing pending). Training over, or a
        checkpoint pending longer than ``stall_s``: snapshot at once."""
        pending = self.pending()
        if pending is None:
            return None
        if pending.target_version != NOW and (not training or now - pending.requested_at > self.stall_s):
            pending.target_version = NOW
        return CheckpointOrder(pending.checkpoint_id, pending.target_version)

    def report(self, server: str, report: CheckpointReport, now: float, unix_s: float) -> Checkpoint | None:
        """A server's answer to an order; returns the checkpoint if this report completed or failed
        it (the caller publishes it), else None. Reports on anything but the pending checkpoint's
        current order (an older target, an earlier checkpoint, a server outside its layout) are
        expected after retargets and restarts, and ignored. Raises InvalidArgument for a report
        that is malformed (nothing changes)."""
        report.check()
        checkpoint = self._checkpoints.get(report.checkpoint_id)
        if (
            checkpoint is None
            or not checkpoint.pending
            or server not in checkpoint.servers
            or report.target_version != checkpoint.target_version
        ):
            return None
        if report.error:
            checkpoint.error = f"{server}: {report.error}"
            return checkpoint
        if report.missed:
            # Past the target before it saw the order: aim further ahead, with twice the lead.
            checkpoint.reports.clear()
            checkpoint.lead_steps = max(MIN_LEAD_STEPS, 2 * checkpoint.lead_steps, self._lead())
            newest = max([report.version] + [v for v, _ in self._seen.values()])
            checkpoint.target_version = newest + checkpoint.lead_steps
            return None
        if checkpoint.target_version != NOW and report.version != checkpoint.target_version:
            return None  # not what was ordered; the next reply asks again
        checkpoint.reports[server] = ServerCheckpoint(server, report.version, report.path)
        if checkpoint.complete:
            checkpoint.completed_unix_s = unix_s
            checkpoint.completed_after_s = max(0.0, now - checkpoint.requested_at)
            return checkpoint
        return None

    # --- reading -------------------------------------------------------------------------------

    def pending(self) -> Checkpoint | None:
        for checkpoint in self._checkpoints.values():
            if checkpoint.pending:
                return checkpoint
        return None

    def get(self, checkpoint_id: str = "") -> Checkpoint:
        """The named checkpoint, or the newest complete one for "". Raises NotFound."""
        if not checkpoint_id:
            latest = self.latest_complete()
            if latest is None:
                raise NotFound("no checkpoint is complete yet")
            return latest
        checkpoint = self._checkpoints.get(parse_id(checkpoint_id))
        if checkpoint is None:
            raise NotFound(f"no checkpoint {checkpoint_id}")
        return replace(checkpoint, reports=dict(checkpoint.reports))

    def latest_complete(self) -> Checkpoint | None:
        done = [c for c in self._checkpoints.values() if c.complete]
        if not done:
            return None
        newest = max(done, key=lambda c: c.sequence)
        return replace(newest, reports=dict(newest.reports))

    # --- durability ----------------------------------------------------------------------------

    def to_state(self) -> dict:
        return {"next": self._next, "checkpoints": [c.to_state() for c in self._checkpoints.values()]}

    def restore(self, state: Mapping, now: float) -> None:
        self._next = state["next"]
        self._checkpoints = {
            c["checkpoint_id"]: Checkpoint.from_state(c, now) for c in state["checkpoints"]
        }


class JobCheckpoints:
    """A job's coordinated checkpoints: asks the layout's servers for them, turns their answers into
    events and publishes each complete one's manifest (with a state directory). Not thread-safe:
    the Job's lock guards it."""

    def __init__(
        self,
        spec: JobSpec,
        events: EventLog,
        wall_clock: Callable[[], float],
        store: JobStore | None,
        specs: Sequence[TensorSpec],
        tied: Mapping[str, str],
    ) -> None:
        self.spec = spec
        self.manifest = CheckpointManifest(spec.mode, spec.heartbeat_interval_s)
        self._events = events
        self._wall_clock = wall_clock
        self._store = store
        self._specs = specs
        self._tied = tied  # state_dict name -> the carried name of the same tensor

    def request(
        self,
        layout: Layout,
        versions: Mapping[str, int],
        training: bool,
        job_state: str,
        now: float,
        reason: str,
        final: bool = False,
    ) -> tuple[Checkpoint, bool]:
        """Opens a checkpoint of ``layout``'s servers (or returns the pending one); returns it and
        whether it is new. ``training``: whether workers may still move the servers' versions."""
        tensors = {s: [t.name for t in layout.tensors_of(s)] for s in layout.servers}
        checkpoint, new = self.manifest.request(
            tensors, versions, training, now, self._wall_clock(), reason, final
        )
        if new:
            self._events.append(
                EventKind.CHECKPOINT_REQUESTED,
                f"checkpoint {checkpoint.checkpoint_id} requested"
                + (f" at version {checkpoint.target_version}" if checkpoint.target_version else "")
                + (f": {reason}" if reason else ""),
                job_state=job_state,
            )
        return checkpoint, new

    def record(
        self,
        member_id: str,
        report: CheckpointReport,
        layout: Layout | None,
        now: float,
        incarnation: int = 0,
    ) -> bool:
        """A server's answer (from ``incarnation`` of ``member_id``, named in the event); returns
        whether it completed or failed a checkpoint (to be saved)."""
        checkpoint = self.manifest.report(member_id, report, now, self._wall_clock())
        if checkpoint is None:
            return False
        if checkpoint.error:
            self._events.append(
                EventKind.CHECKPOINT_FAILED,
                f"checkpoint {checkpoint.checkpoint_id} failed: {checkpoint.error}",
                member_id=member_id,
                incarnation=incarnation,
            )
        else:
            versions = ", ".join(f"{r.member_id}@{r.version}" for r in checkpoint.reports.values())
            self._events.append(
                EventKind.CHECKPOINT_COMPLETED,
                f"checkpoint {checkpoint.checkpoint_id} complete ({versions}) after "
                f"{checkpoint.completed_after_s:.2f}s",
                member_id=member_id,
                incarnation=incarnation,
            )
        if self._store is not None and checkpoint.complete:
            checkpoint.manifest_path = self._store.write_manifest(
                checkpoint.checkpoint_id, self._manifest_document(checkpoint, layout)
            )
        return True

    def _manifest_document(self, checkpoint: Checkpoint, layout: Layout | None) -> dict:
        """The JSON manifest ``lepton export`` reads: enough to rebuild the model without a cluster."""
        return {
            "format": "lepton-checkpoint-manifest/1",
            **checkpoint.to_state(),
            "consistent": checkpoint.consistent,
            # name -> where a slice's rows go: export concatenates a parameter's slices in row order
            "slices": {
                t.name: {
                    "parameter": t.parameter,
                    "row_offset": t.row_offset,
                    "parameter_shape": list(t.parameter_shape),
                }
                for t in (layout.tensors if layout is not None else ())
                if t.is_slice
            },
            "job": {**dataclasses.asdict(self.spec), "optimizer_kwargs": dict(self.spec.optimizer_kwargs)},
            # tied weights: export writes the carried tensor under these state_dict names too
            "tied": dict(self._tied),
            "kinds": {t.name: t.kind.value for t in self._specs},
        }
