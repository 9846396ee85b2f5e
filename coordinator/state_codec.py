"""The coordinator's saved state as a versioned schema: typed records in, JSON documents out.

The state directory holds named documents (``job``, ``members``, ``ledger``, ``format``), the
completion rows and the event history (coordinator/statedb.py). ``format`` carries the schema
version; a state saved before it existed is version 1. ``decode`` upgrades older documents one
version at a time (``UPGRADES[v]`` turns version v into v + 1) and then reads the current version
strictly: every key must be there.

Version 2 writes the same documents as version 1 plus ``format``; upgrading 1 -> 2 fills in what
coordinators before then did not write yet (zero counters, empty maps).

Version 3 keeps members and shards as rows of their own (``member`` rows keyed by member id,
``shard`` rows keyed by shard index), so a commit rewrites only the members and shards that
changed; the ``members`` document keeps only ``fenced_rejections`` and the ``ledger`` document
only the ledger's counters (``ShardLedger.counters``). Upgrading 2 -> 3 splits the old documents
into rows; ``decode`` assembles rows back into the forms ``MembershipTable.restore`` and
``ShardLedger.restore`` take.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from coordinator.events import Event
from coordinator.job_types import EvaluationResult, JobState
from coordinator.layout import Layout
from coordinator.ledger import Completion
from coordinator.statedb import SavedCompletion, SavedJob
from coordinator.validation import ValidationRecord
from lepton.config import JobSpec, job_from_mapping
from lepton.errors import ConfigError
from lepton.tensors import TensorSpec, row_slice

FORMAT_VERSION = 3
MEMBER_ROWS = "member"
SHARD_ROWS = "shard"


@dataclass(frozen=True)
class ServersRecord:
    """The parameter servers' side of the job (coordinator/fleet.py)."""

    ready: tuple[str, ...]
    versions: dict[str, int]
    lost: tuple[str, ...]  # servers of the layout waiting to restart; their clocks restart too
    fence_version: int
    restarts: int
    steps_rolled_back: int


@dataclass(frozen=True)
class JobRecord:
    """The ``job`` document: the lifecycle, its counters, the layout and the checkpoints."""

    spec: JobSpec
    state: JobState
    failure: str
    dead_count: int
    samples: int
    training_seconds: float
    evaluator: tuple[str, int] | None
    evaluation: EvaluationResult | None
    last_epoch_announced: int
    leases_granted: int
    heartbeats_missed: int
    leases_expired: int
    layout: Layout | None
    next_event_sequence: int
    servers: ServersRecord
    checkpoints: dict  # CheckpointManifest.to_state()
    validation: tuple[ValidationRecord, ...] = ()
    validation_due: int | None = None  # the ended epoch whose validation is pending
    stopped_early: str = ""


@dataclass(frozen=True)
class StateRecord:
    """Everything a coordinator restores from: the job, and its members' and ledger's own state."""

    job: JobRecord
    members: dict  # MembershipTable.to_state()
    ledger: dict  # ShardLedger.to_state(), without the completions
    completions: list[Completion]
    events: list[Event]


def spec_document(spec: JobSpec) -> dict:
    return {**dataclasses.asdict(spec), "optimizer_kwargs": dict(spec.optimizer_kwargs)}


# --- writing -------------------------------------------------------------------------------------


def _layout_document(layout: Layout | None) -> dict | None:
    if layout is None:
        return None
    return {
        "version": layout.version,
        "servers": list(layout.servers),
        "assignment": {
            s: [[t.of, *t.rows] if t.is_slice else t.name for t in ts] for s, ts in layout.assignment.items()
        },
    }


def encode(job: JobRecord, fenced_rejections: int, ledger_counters: dict) -> dict[str, dict]:
    """The documents of the current version (members, shards, completions and events are saved as
    rows)."""
    return {
        "format": {"version": FORMAT_VERSION},
        "job": encode_job(job),
        "members": {"fenced_rejections": fenced_rejections},
        "ledger": ledger_counters,
    }


def encode_job(job: JobRecord) -> dict:
    servers = job.servers
    return {
        "spec": spec_document(job.spec),
        "state": job.state.name,
        "failure": job.failure,
        "dead_count": job.dead_count,
        "samples": job.samples,
        "training_seconds": job.training_seconds,
        "evaluator": list(job.evaluator) if job.evaluator else None,
        "evaluation": dataclasses.asdict(job.evaluation) if job.evaluation else None,
        "last_epoch_announced": job.last_epoch_announced,
        "leases_granted": job.leases_granted,
        "heartbeats_missed": job.heartbeats_missed,
        "layout": _layout_document(job.layout),
        "ready": sorted(servers.ready),
        "next_event_sequence": job.next_event_sequence,
        "ps_restarts": servers.restarts,
        "steps_rolled_back": servers.steps_rolled_back,
        "leases_expired": job.leases_expired,
        "ps_versions": dict(servers.versions),
        "ps_lost": sorted(servers.lost),
        "fence_version": servers.fence_version,
        "checkpoints": job.checkpoints,
        "validation": [row.to_state() for row in job.validation],
        "validation_due": job.validation_due,
        "stopped_early": job.stopped_early,
    }


def saved_completion(completion: Completion) -> SavedCompletion:
    return SavedCompletion(completion.epoch, completion.shard, completion.member_id, completion.incarnation)


# --- reading -------------------------------------------------------------------------------------


def _upgrade_1_to_2(documents: dict[str, dict]) -> dict[str, dict]:
    """Fills in what coordinators wrote only later in version 1's life."""
    job = {
        "ps_restarts": 0, "steps_rolled_back": 0, "leases_expired": 0, "ps_versions": {}, "ps_lost": [],
        "fence_version": 0, "checkpoints": {"next": 1, "checkpoints": []}, **documents["job"],
    }
    job["checkpoints"] = {
        **job["checkpoints"],
        "checkpoints": [{"tensors": {}, "manifest_path": "", **c} for c in job["checkpoints"]["checkpoints"]],
    }
    members = {"fenced_rejections": 0, **documents["members"]}
    ledger = {"last_lease_id": 0, "holders": [], "deaths": {}, "quarantined": [], **documents["ledger"]}
    ledger["leases"] = [row if len(row) > 5 else [*row[:5], 0] for row in ledger["leases"]]  # no lease id: 0
    return {**documents, "format": {"version": 2}, "job": job, "members": members, "ledger": ledger}


def _upgrade_2_to_3(documents: dict[str, dict], rows: dict[str, dict]) -> tuple[dict[str, dict], dict[str, dict]]:
    """Splits the members and ledger documents into member and shard rows."""
    members, ledger = documents["members"], documents["ledger"]
    member_rows = {row[0]: list(row) for row in members["members"]}
    shards: dict[int, dict] = {}

    def shard(i: int) -> dict:
        return shards.setdefault(int(i), {
            "pending": None, "lease": None, "done": False, "deaths": 0, "quarantined": False, "holders": [],
        })

    for position, (i, offset) in enumerate(ledger["pending"]):
        shard(i)["pending"] = [position, offset]
    for i, epoch, member_id, incarnation, offset, lease_id in ledger["leases"]:
        shard(i)["lease"] = [epoch, member_id, incarnation, offset, lease_id]
    for i in ledger["done"]:
        shard(i)["done"] = True
    for i, count in ledger["deaths"].items():
        shard(int(i))["deaths"] = count
    for i in ledger["quarantined"]:
        shard(i)["quarantined"] = True
    for epoch, i, member_id in ledger["holders"]:
        shard(i)["holders"].append([epoch, member_id])
    counters = {k: ledger[k] for k in ("epoch", "last_lease_id", "duplicates_rejected", "reassignments")}
    documents = {
        **documents, "format": {"version": 3}, "members": {"fenced_rejections": members["fenced_rejections"]},
        "ledger": counters,
    }
    rows = {**rows, MEMBER_ROWS: member_rows, SHARD_ROWS: {str(i): body for i, body in shards.items()}}
    return documents, rows


def _documents_only(
    step: Callable[[dict[str, dict]], dict[str, dict]],
) -> Callable[[dict[str, dict], dict[str, dict]], tuple[dict[str, dict], dict[str, dict]]]:
    return lambda documents, rows: (step(documents), rows)


UPGRADES: dict[int, Callable[[dict[str, dict], dict[str, dict]], tuple[dict[str, dict], dict[str, dict]]]] = {
    1: _documents_only(_upgrade_1_to_2),
    2: _upgrade_2_to_3,
}


def upgrade(documents: dict[str, dict], rows: dict[str, dict] | None = None) -> tuple[dict[str, dict], dict[str, dict]]:
    """The documents and rows in the current version. Raises ConfigError for a version this
    coordinator does not know (a state directory written by a newer one)."""
    rows = dict(rows or {})
    version = documents.get("format", {"version": 1})["version"]
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"the state directory was written in state format {version}; this coordinator reads up to "
            f"{FORMAT_VERSION}: run a newer coordinator or use a new --state-dir"
        )
    while version < FORMAT_VERSION:
        documents, rows = UPGRADES[version](documents, rows)
        version += 1
    return documents, rows


def _assemble(documents: dict[str, dict], rows: dict[str, dict]) -> tuple[dict, dict]:
    """Member and shard rows as ``MembershipTable.to_state()`` and ``ShardLedger.to_state()``."""
    members = {
        "members": list(rows.get(MEMBER_ROWS, {}).values()),
        "fenced_rejections": documents["members"]["fenced_rejections"],
    }
    shards = sorted((int(i), body) for i, body in rows.get(SHARD_ROWS, {}).items())
    queued = sorted((body["pending"][0], i, body["pending"][1]) for i, body in shards if body["pending"] is not None)
    ledger = {
        **documents["ledger"],
        "pending": [[i, offset] for _, i, offset in queued],
        "leases": [[i, *body["lease"]] for i, body in shards if body["lease"] is not None],
        "holders": [[epoch, i, member_id] for i, body in shards for epoch, member_id in body["holders"]],
        "done": [i for i, body in shards if body["done"]],
        "deaths": {str(i): body["deaths"] for i, body in shards if body["deaths"]},
        "quarantined": [i for i, body in shards if body["quarantined"]],
    }
    return members, ledger


def _layout(document: Mapping | None, specs: Sequence[TensorSpec]) -> Layout | None:
    if document is None:
        return None
    by_name = {s.name: s for s in specs}
    return Layout(
        document["version"],
        tuple(document["servers"]),
        {
            s: tuple(by_name[n] if isinstance(n, str) else row_slice(by_name[n[0]], n[1], n[2]) for n in names)
            for s, names in document["assignment"].items()
        },
    )


def decode_job(job: Mapping, specs: Sequence[TensorSpec]) -> JobRecord:
    return JobRecord(
        spec=job_from_mapping(job["spec"]),
        state=JobState[job["state"]],
        failure=job["failure"],
        dead_count=job["dead_count"],
        samples=job["samples"],
        training_seconds=job["training_seconds"],
        evaluator=(job["evaluator"][0], job["evaluator"][1]) if job["evaluator"] else None,
        evaluation=EvaluationResult.from_state(job["evaluation"]) if job["evaluation"] else None,
        last_epoch_announced=job["last_epoch_announced"],
        leases_granted=job["leases_granted"],
        heartbeats_missed=job["heartbeats_missed"],
        leases_expired=job["leases_expired"],
        layout=_layout(job["layout"], specs),
        next_event_sequence=job["next_event_sequence"],
        servers=ServersRecord(
            ready=tuple(job["ready"]),
            versions=dict(job["ps_versions"]),
            lost=tuple(job["ps_lost"]),
            fence_version=job["fence_version"],
            restarts=job["ps_restarts"],
            steps_rolled_back=job["steps_rolled_back"],
        ),
        checkpoints=job["checkpoints"],
        # Absent from state saved before validation during training existed.
        validation=tuple(ValidationRecord.from_state(row) for row in job.get("validation", ())),
        validation_due=job.get("validation_due"),
        stopped_early=job.get("stopped_early", ""),
    )


def decode(saved: SavedJob, specs: Sequence[TensorSpec]) -> StateRecord:
    """The saved state as records, upgraded to the current version. ``specs``: the job's tensors,
    which the layout names. Raises ConfigError for a state format from the future."""
    documents, rows = upgrade(dict(saved.documents), dict(saved.rows))
    members, ledger = _assemble(documents, rows)
    return StateRecord(
        job=decode_job(documents["job"], specs),
        members=members,
        ledger=ledger,
        completions=[Completion(c.epoch, c.shard, c.member_id, c.incarnation) for c in saved.completions],
        events=[Event.from_dict(body) for body in saved.events],
    )
