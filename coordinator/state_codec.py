"""The coordinator's saved state as a versioned schema: typed records in, JSON documents out.

The state directory holds named documents (``job``, ``members``, ``ledger``, ``format``), the
completion rows and the event history (coordinator/statedb.py). ``format`` carries the schema
version; a state saved before it existed is version 1. ``decode`` upgrades older documents one
version at a time (``UPGRADES[v]`` turns version v into v + 1) and then reads the current version
strictly: every key must be there.

Version 2 writes the same documents as version 1 plus ``format``; upgrading 1 -> 2 fills in what
coordinators before then did not write yet (zero counters, empty maps).
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
from lepton.config import JobSpec, job_from_mapping
from lepton.errors import ConfigError
from lepton.tensors import TensorSpec, row_slice

FORMAT_VERSION = 2


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


def encode(job: JobRecord, members: dict, ledger: dict) -> dict[str, dict]:
    """The documents of the current version (completions and events are saved as rows)."""
    servers = job.servers
    return {
        "format": {"version": FORMAT_VERSION},
        "job": {
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
        },
        "members": members,
        "ledger": ledger,
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


UPGRADES: dict[int, Callable[[dict[str, dict]], dict[str, dict]]] = {1: _upgrade_1_to_2}


def upgrade(documents: dict[str, dict]) -> dict[str, dict]:
    """The documents in the current version. Raises ConfigError for a version this coordinator does
    not know (a state directory written by a newer one)."""
    version = documents.get("format", {"version": 1})["version"]
    if version > FORMAT_VERSION:
        raise ConfigError(
            f"the state directory was written in state format {version}; this coordinator reads up to "
            f"{FORMAT_VERSION}: run a newer coordinator or use a new --state-dir"
        )
    while version < FORMAT_VERSION:
        documents = UPGRADES[version](documents)
        version += 1
    return documents


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
    )


def decode(saved: SavedJob, specs: Sequence[TensorSpec]) -> StateRecord:
    """The saved state as records, upgraded to the current version. ``specs``: the job's tensors,
    which the layout names. Raises ConfigError for a state format from the future."""
    documents = upgrade(dict(saved.documents))
    return StateRecord(
        job=decode_job(documents["job"], specs),
        members=documents["members"],
        ledger=documents["ledger"],
        completions=[Completion(c.epoch, c.shard, c.member_id, c.incarnation) for c in saved.completions],
        events=[Event.from_dict(body) for body in saved.events],
    )
