"""The parameter server's domain object: store + consistency gate + worker roster, behind one small
API that the servicer calls once per RPC, and that the agent loads and keeps in step with the
coordinator. Nothing here knows about gRPC."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch

from lepton.domain import CheckpointReport
from lepton.errors import InvalidArgument, LeptonError, NotReady
from lepton.tensors import TensorKind, TensorSpec, payload_bytes
from ps_server.checkpoint_files import CheckpointDirectory
from ps_server.consistency import consistency_gate
from ps_server.gate import ConsistencyGate, PushResult
from ps_server.periodic_checkpoints import FLUSH_TIMEOUT_S, CheckpointTally, PeriodicCheckpoints
from ps_server.roster import WorkerEntry, WorkerRoster
from ps_server.staleness import staleness_lr_scaling
from ps_server.store import ParameterStore

MIN_REFRESH_INTERVAL_S = 0.2
NOT_READY_RETRY_S = 0.2  # the delay a Pull/Push/JoinSteps before the assignment is told to wait
# Turns (version, the live tensors, the push's result or None) into what a read returns; called
# under the gate's lock, so it must copy what it keeps (the servicer's encoder does).
Pack = Callable[[int, list[tuple[str, torch.Tensor]], "PushResult | None"], Any]


@dataclass(frozen=True)
class ServerStatus:
    member_id: str
    mode: str
    version: int
    updates_applied: int
    pushes_received: int
    pushes_stale: int
    pushes_rejected: int
    steps_timed_out: int
    max_clock_gap: int
    max_compute_gap: int
    max_staleness: int
    mean_staleness: float
    bytes_pulled: int
    bytes_pushed: int
    checkpoints_failed: int = 0


class ParameterServer:
    """Serves this server's share of the parameters.

    Args:
        refresh_roster: asks the coordinator for the current worker list (called when a push names
            a worker this server has not heard of yet); returns the entries.

    Raises FailedPrecondition before an assignment is loaded, Fenced/NotFound for bad identities,
    InvalidArgument for bad gradients, DeadlineExceeded when a sync step does not close in time.
    """

    def __init__(
        self,
        member_id: str = "",
        refresh_roster: Callable[[], Iterable[WorkerEntry]] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.member_id = member_id
        self._refresh = refresh_roster
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._refresh_lock = threading.Lock()
        self._gate: ConsistencyGate | None = None
        self._roster = WorkerRoster()
        self._last_refresh = float("-inf")
        self.pushes_rejected = 0
        self.checkpoint_tally = CheckpointTally()  # periodic checkpoints written and failed
        self._checkpoints: CheckpointDirectory | None = None
        self._periodic: PeriodicCheckpoints | None = None  # the writer of the loaded assignment
        self._no_state_dir = False  # loaded without a checkpoint directory: ordered checkpoints fail
        self._snapshot: CheckpointReport | None = None  # the answer to the latest checkpoint order
        self.bytes_pulled = 0
        self.bytes_pushed = 0
        # Called with every roster update's entries (shared-memory sessions end with their member).
        self.roster_listeners: list[Callable[[list[WorkerEntry]], None]] = []

    def load(
        self,
        tensors: Mapping[str, torch.Tensor],
        optimizer: str,
        lr: float,
        optimizer_kwargs: Mapping[str, Any],
        mode: str,
        step_timeout_s: float,
        checkpoints: CheckpointDirectory | None = None,
        checkpoint_every_steps: int = 0,
        lr_schedule: str = "constant",
        lr_schedule_kwargs: Mapping[str, Any] | None = None,
        staleness: int = 0,
        sparse: Collection[str] = (),
        kinds: Mapping[str, TensorKind] | None = None,
        async_lr_scaling: str = "staleness",
        warmup_steps: int = 0,
    ) -> int:
        """Builds the store from the assignment, or from the newest checkpoint in ``checkpoints``
        when there is one; returns the version it serves from (0 for a fresh start). A reload
        first finishes the previous assignment's checkpoint writes (see ``close``)."""
        self.close()
        store = ParameterStore(
            tensors, optimizer, lr, optimizer_kwargs, lr_schedule, lr_schedule_kwargs, sparse, kinds, warmup_steps
        )
        if checkpoints is not None:
            checkpoints.remove_torn()  # this process's writer is closed: no write is in flight
        restored = checkpoints.latest() if checkpoints is not None else None
        if restored is not None:
            store.load_state_dict(restored[1])
        after_apply = (
            PeriodicCheckpoints(checkpoints, checkpoint_every_steps, self.checkpoint_tally)
            if checkpoints is not None and checkpoint_every_steps > 0
            else None
        )
        gate = consistency_gate(
            store, mode, step_timeout_s, after_apply, staleness, staleness_lr_scaling(async_lr_scaling)
        )
        if after_apply is not None:
            after_apply.attach(gate.under_lock)
        with self._lock:
            self._gate = gate
            self._periodic = after_apply
            self._checkpoints = checkpoints
            self._no_state_dir = checkpoints is None
        return store.version

    def answer_checkpoint(self, checkpoint_id: str, target_version: int) -> CheckpointReport | None:
        """Carries out the coordinator's checkpoint order: the report to send with the next
        heartbeat, or None while the target version is still ahead (or nothing is loaded yet).
        The same order gets the same answer (the file is written once)."""
        done = self._snapshot
        if done is not None and (done.checkpoint_id, done.target_version) == (checkpoint_id, target_version):
            return done
        gate = self._gate
        if gate is None:
            return None
        if self._no_state_dir:
            report = CheckpointReport(
                checkpoint_id, target_version, gate.version,
                error=f"parameter server {self.member_id} runs without --state-dir: nowhere to write a checkpoint",
            )
        else:
            capture = gate.capture(target_version)
            if capture.missed:
                report = CheckpointReport(checkpoint_id, target_version, capture.version, missed=True)
            elif capture.state is None:
                return None
            else:
                assert self._checkpoints is not None
                try:
                    path = str(self._checkpoints.save_snapshot(checkpoint_id, capture.state))
                except OSError as exc:  # disk full, permissions: the checkpoint fails, training goes on
                    report = CheckpointReport(checkpoint_id, target_version, capture.version, error=str(exc))
                else:
                    report = CheckpointReport(checkpoint_id, target_version, capture.version, path)
        self._snapshot = report
        return report

    def close(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Finishes the periodic checkpoint being written and a coalesced one (up to ``timeout_s``)
        and stops taking more; returns whether they were written in time. Call it once nothing is
        pushed any more (after the gRPC server stopped), and not under the gate's lock."""
        with self._lock:
            periodic, self._periodic = self._periodic, None
        return periodic.close(timeout_s) if periodic is not None else True

    def flush_checkpoints(self, timeout_s: float = FLUSH_TIMEOUT_S) -> bool:
        """Waits until no periodic checkpoint is being written; returns whether that happened in time."""
        periodic = self._periodic
        return periodic.flush(timeout_s) if periodic is not None else True

    @property
    def checkpoint_version(self) -> int:
        """The newest periodic checkpoint written (-1: none)."""
        return self.checkpoint_tally.version

    @property
    def checkpoints_failed(self) -> int:
        """Periodic checkpoints that could not be written (disk full, ...)."""
        return self.checkpoint_tally.failed

    @property
    def gate(self) -> ConsistencyGate:
        gate = self._gate
        if gate is None:
            raise NotReady(
                "this parameter server has not loaded its assignment yet; retry shortly", NOT_READY_RETRY_S
            )
        return gate

    def gate_or_none(self) -> ConsistencyGate | None:
        return self._gate

    @property
    def fenced_rejections(self) -> int:
        with self._lock:
            return self._roster.fenced_rejections

    @property
    def specs(self) -> Mapping[str, TensorSpec]:
        return self.gate.store.specs

    # --- membership ----------------------------------------------------------------------------

    def update_roster(self, entries: Iterable[WorkerEntry]) -> None:
        entries = list(entries)
        with self._lock:
            live = self._roster.update(entries)
        if self._gate is not None:
            self._gate.retain_live(live)
        for listener in self.roster_listeners:
            listener(entries)

    def authorise(self, member_id: str, incarnation: int) -> None:
        """Raises Fenced/NotFound unless the identity is a live worker of the job (see pull)."""
        self._authorise(member_id, incarnation)

    def _authorise(self, member_id: str, incarnation: int) -> None:
        """Fences the request against the roster; an identity the roster does not know yet (a
        worker that registered since the last heartbeat) triggers one refresh from the
        coordinator. Refreshes are serialised and at most one per MIN_REFRESH_INTERVAL_S."""
        with self._lock:
            if self._roster.check(member_id, incarnation):
                return
        if self._refresh is not None:
            with self._refresh_lock:
                with self._lock:
                    if self._roster.check(member_id, incarnation):
                        return
                wait_s = self._last_refresh + MIN_REFRESH_INTERVAL_S - self._monotonic()
                if wait_s > 0:
                    time.sleep(wait_s)  # rate limit: concurrent unknown ids share one refresh
                self._last_refresh = self._monotonic()
                self.update_roster(self._refresh())
        with self._lock:
            self._roster.check_final(member_id, incarnation)

    # --- data plane ----------------------------------------------------------------------------

    def pull(
        self,
        member_id: str,
        incarnation: int,
        names: list[str],
        rows: Mapping[str, torch.Tensor] | None = None,
        pack: Pack | None = None,
    ) -> tuple[int, Any]:
        """Whole tensors ``names`` (all when both are empty) and the selected rows of ``rows``:
        (version, copies of them), or with ``pack`` (version, ``pack(version, tensors)``), called
        under the gate's lock on the live tensors (it must copy what it keeps: an encoder).

        Each tensor may be named once (the store refuses one both whole and by rows, and repeated
        rows), so a response never exceeds this server's own parameters: no request amplifies
        itself. A repeated name raises InvalidArgument before anything is copied."""
        self._authorise(member_id, incarnation)
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise InvalidArgument(f"tensor {name!r} is asked for more than once; name each tensor once")
            seen.add(name)
        return self._read(names, rows, pack, None)

    def _read(
        self, names: list[str], rows: Mapping[str, torch.Tensor] | None, pack: Pack | None, result: PushResult | None
    ) -> tuple[int, Any]:
        pulled = 0

        def read(version: int, tensors: list[tuple[str, torch.Tensor]]) -> Any:
            nonlocal pulled
            pulled = sum(t.numel() * t.element_size() for _, t in tensors)
            if pack is None:
                return [(n, t.clone()) for n, t in tensors]
            return pack(version, tensors, result)

        version, out = self.gate.read(names, rows, read)
        self._count(bytes_pulled=pulled)
        return version, out

    def _count(self, *, bytes_pulled: int = 0, bytes_pushed: int = 0, rejected: int = 0) -> None:
        with self._lock:
            self.bytes_pulled += bytes_pulled
            self.bytes_pushed += bytes_pushed
            self.pushes_rejected += rejected

    def push(
        self,
        member_id: str,
        incarnation: int,
        base_version: int,
        sample_count: int,
        grads: Mapping[str, torch.Tensor],
        timeout_s: float,
        request_id: str = "",
        wire_bytes: int | None = None,
    ) -> PushResult:
        """``wire_bytes``: the gradient bytes as they travelled (compressed ones encoded), for the
        ``bytes_pushed`` counter; None: the gradients' own size."""
        gate = self.gate
        try:
            self._authorise(member_id, incarnation)
            if sample_count < 1:
                raise InvalidArgument(f"sample_count must be >= 1, got {sample_count}")
            if base_version < 0:
                raise InvalidArgument(f"base_version must be >= 0, got {base_version}")
            gate.store.check_gradients(grads)
        except LeptonError:
            self._count(rejected=1)
            raise
        self._count(bytes_pushed=sum(payload_bytes(g) for g in grads.values()) if wire_bytes is None else wire_bytes)
        outcome = gate.push(member_id, base_version, grads, sample_count, self._monotonic(), request_id)
        return gate.settle(outcome, timeout_s, member_id, request_id)

    def push_pull(
        self,
        member_id: str,
        incarnation: int,
        base_version: int,
        sample_count: int,
        grads: Mapping[str, torch.Tensor],
        timeout_s: float,
        request_id: str = "",
        pack: Pack | None = None,
        wire_bytes: int | None = None,
    ) -> tuple[PushResult, int, Any]:
        """Push, then the parameters as they are once it was applied (or found stale): dense
        tensors whole, of sparse ones the rows this push carried. Frozen tensors never change,
        so they are left out (a Pull gives them). With ``pack``, the parameters are
        ``pack(version, tensors, result)`` (see ``pull``)."""
        result = self.push(member_id, incarnation, base_version, sample_count, grads, timeout_s, request_id, wire_bytes)
        store = self.gate.store
        sparse = store.sparse
        specs = store.specs
        dense = [n for n in store.names if n not in sparse and specs[n].pushed]
        rows = {n: g._indices()[0] for n, g in grads.items() if n in sparse}
        if not dense and not rows:
            version = self.gate.version
            return result, version, [] if pack is None else pack(version, [], result)
        version, out = self._read(dense, rows, pack, result)
        return result, version, out

    def push_layout(self, rows: Mapping[str, torch.Tensor]) -> dict[str, TensorSpec]:
        """What a push with row selections ``rows`` (name -> row indices) must carry: every tensor
        held here, with the selected ones as ``len(rows)`` rows. Only sparse tensors may be
        pushed by rows (InvalidArgument otherwise, and for names not held here)."""
        specs = self.specs
        expected = dict(specs)
        for name, selected in rows.items():
            spec = specs.get(name)
            if spec is None:
                raise InvalidArgument(f"rows of {name!r}, which is not held here")
            if not spec.sparse:
                raise InvalidArgument(f"{name!r} is dense: push it whole, not by rows")
            if not spec.shape:
                raise InvalidArgument(f"tensor {name!r} has no rows (0-dim)")
            expected[name] = replace(spec, shape=(len(selected), *spec.shape[1:]))
        return expected

    def note_rejected(self) -> None:
        """Counts a push refused before it reached ``push`` (undecodable chunks)."""
        self._count(rejected=1)

    def join_steps(self, member_id: str, incarnation: int, from_version: int, timeout_s: float) -> tuple[bool, int]:
        """See ConsistencyGate.join."""
        self._authorise(member_id, incarnation)
        if from_version < 0:
            raise InvalidArgument(f"from_version must be >= 0, got {from_version}")
        return self.gate.join(member_id, from_version, timeout_s)

    def leave_steps(self, member_id: str, incarnation: int) -> None:
        self._authorise(member_id, incarnation)
        self.gate.leave(member_id)

    @property
    def failure(self) -> str:
        """Why this server can no longer apply updates (its optimizer raised); empty while it can."""
        gate = self._gate
        return gate.store.failure if gate is not None else ""

    def tick(self) -> None:
        if self._gate is not None:
            self._gate.tick(self._monotonic())

    def status(self) -> ServerStatus:
        gate = self._gate
        c = gate.counters if gate is not None else None
        return ServerStatus(
            member_id=self.member_id,
            mode=gate.mode if gate is not None else "",
            version=gate.version if gate is not None else 0,
            updates_applied=c.updates_applied if c else 0,
            pushes_received=c.pushes_received if c else 0,
            pushes_stale=c.pushes_stale if c else 0,
            pushes_rejected=self.pushes_rejected,
            steps_timed_out=c.steps_timed_out if c else 0,
            max_clock_gap=c.clock_gap_max if c else 0,
            max_compute_gap=c.compute_gap_max if c else 0,
            max_staleness=c.staleness_max if c else 0,
            mean_staleness=c.staleness_mean if c else 0.0,
            bytes_pulled=self.bytes_pulled,
            bytes_pushed=self.bytes_pushed,
            checkpoints_failed=self.checkpoints_failed,
        )
