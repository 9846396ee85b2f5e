"""The shard ledger: which shards of the current epoch are pending, leased or done.

A pull-based work queue (ElasticDL's todo/doing/done): workers lease one shard at a time, report
the offset they reached, and complete it. Each (epoch, shard) is counted once; a second completion
raises DuplicateCompletion and is counted. ``requeue(member)`` returns what moved, for the caller
to log and publish.

Every lease has an id (never reused in the job) and a deadline on the coordinator's monotonic
clock: granted at ``now + lease_timeout_s``, pushed out by ``renew`` (heartbeats) and ``progress``.
``expired(now)`` lists the leases past their deadline; the caller revokes them (fencing the
holder first). Deadlines are not saved: a restored ledger gives every lease a fresh one.

``dirty`` names the shards changed since the job last collected them for a commit; ``shard_row``
is one shard's saved row (coordinator/state_codec.py turns rows back into ``to_state``'s form).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from lepton.errors import DuplicateCompletion, FailedPrecondition, InvalidArgument, NotFound


@dataclass(frozen=True)
class Shard:
    index: int
    start: int
    end: int

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass
class Lease:
    """A shard handed to one incarnation of a worker, with the offset reached so far."""

    epoch: int
    shard: Shard
    member_id: str
    incarnation: int
    offset: int
    lease_id: int = 0
    deadline: float = 0.0  # coordinator monotonic seconds


def split(num_samples: int, num_shards: int) -> list[Shard]:
    """Contiguous, near-equal ranges covering [0, num_samples)."""
    if num_samples < 1:
        raise InvalidArgument("the training set is empty")
    if num_shards < 1:
        raise InvalidArgument(f"need at least one shard, got {num_shards}")
    num_shards = min(num_shards, num_samples)
    base, extra = divmod(num_samples, num_shards)
    shards, start = [], 0
    for i in range(num_shards):
        end = start + base + (1 if i < extra else 0)
        shards.append(Shard(i, start, end))
        start = end
    return shards


@dataclass(frozen=True)
class Completion:
    epoch: int
    shard: int
    member_id: str
    incarnation: int


class ShardLedger:
    """Pending, leased and done shards of the current epoch, across ``epochs`` epochs.

    Raises NotFound (unknown shard or epoch), FailedPrecondition (lease not held, epoch over) and
    DuplicateCompletion (already completed).
    """

    def __init__(
        self,
        num_samples: int,
        shards_per_epoch: int,
        epochs: int,
        max_attempts: int = 0,
        lease_timeout_s: float = 10.0,
    ) -> None:
        if not lease_timeout_s > 0:
            raise InvalidArgument(f"lease_timeout_s must be > 0, got {lease_timeout_s}")
        self.shards = split(num_samples, shards_per_epoch)
        self.lease_timeout_s = lease_timeout_s
        self._last_lease_id = 0
        self.max_attempts = max_attempts  # 0: never quarantine
        self._deaths: dict[int, int] = {}
        self.quarantined: set[int] = set()
        self.epochs = epochs
        self.epoch = 0
        self._pending: deque[tuple[int, int]] = deque()
        self._queued: dict[int, tuple[int, int]] = {}  # pending shard -> (queue position, offset)
        self._front = 0  # the position a requeued shard takes (ahead of every other)
        self._refill(s.index for s in self.shards)
        self.dirty: set[int] = set(range(len(self.shards)))
        self._leases: dict[int, Lease] = {}
        self._done: set[int] = set()
        self.completions: list[Completion] = []
        # Every member ever granted each (epoch, shard): a completion of a done shard counts as a
        # duplicate only from one of them; anyone else never held it (ownership before duplication).
        self._holders: dict[tuple[int, int], set[str]] = {}
        self.duplicates_rejected = 0
        self.reassignments = 0

    @property
    def finished(self) -> bool:
        return self.epoch >= self.epochs

    @property
    def done_in_epoch(self) -> int:
        return len(self._done)

    @property
    def leased(self) -> int:
        return len(self._leases)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _refill(self, indices) -> None:  # type: ignore[no-untyped-def]
        self._pending = deque((i, 0) for i in indices)
        self._queued = {i: (position, 0) for position, (i, _) in enumerate(self._pending)}
        self._front = 0

    def lease_of(self, member_id: str) -> Lease | None:
        for lease in self._leases.values():
            if lease.member_id == member_id:
                return lease
        return None

    def lease(self, member_id: str, incarnation: int, now: float = 0.0) -> Lease | None:
        """The member's current lease (renewed), or a new one from the queue; None if the queue
        is empty."""
        held = self.lease_of(member_id)
        if held is not None and held.incarnation == incarnation:
            held.deadline = now + self.lease_timeout_s
            return held  # a retried LeaseShard gets the same answer
        if self.finished or not self._pending:
            return None
        index, offset = self._pending.popleft()
        del self._queued[index]
        self.dirty.add(index)
        self._last_lease_id += 1
        lease = Lease(
            self.epoch, self.shards[index], member_id, incarnation, offset,
            lease_id=self._last_lease_id, deadline=now + self.lease_timeout_s,
        )
        self._leases[index] = lease
        self._holders.setdefault((self.epoch, index), set()).add(member_id)
        return lease

    def renew(self, member_id: str, incarnation: int, now: float) -> int:
        """Pushes out the deadline of every lease this incarnation holds; returns how many."""
        renewed = 0
        for lease in self._leases.values():
            if (lease.member_id, lease.incarnation) == (member_id, incarnation):
                lease.deadline = max(lease.deadline, now + self.lease_timeout_s)
                renewed += 1
        return renewed

    def renew_from(self, heard: Callable[[str, int], float | None], now: float) -> None:
        """Renews every lease from its holder's last heartbeat (``heard(member_id, incarnation)``,
        None for a holder not alive), as ``renew`` would have when that heartbeat arrived."""
        for lease in self._leases.values():
            last = heard(lease.member_id, lease.incarnation)
            if last is not None:
                lease.deadline = max(lease.deadline, min(last, now) + self.lease_timeout_s)

    def excuse(self, stall_s: float, now: float) -> None:
        """Pushes every deadline out by ``stall_s`` (the coordinator could not hear renewals then),
        never past a full lease timeout from ``now``."""
        for lease in self._leases.values():
            lease.deadline = max(lease.deadline, min(lease.deadline + stall_s, now + self.lease_timeout_s))

    def expired(self, now: float) -> list[Lease]:
        """Leases whose deadline has passed (nothing changes; the caller revokes them)."""
        return [lease for lease in self._leases.values() if lease.deadline < now]

    def _held(
        self, member_id: str, incarnation: int, epoch: int, shard: int, lease_id: int = 0
    ) -> Lease:
        if not 0 <= shard < len(self.shards):
            raise NotFound(f"no shard {shard}; shards are 0..{len(self.shards) - 1}")
        if epoch > self.epoch or epoch < 0:
            raise NotFound(f"epoch {epoch} has not started (current epoch {self.epoch})")
        if lease_id > self._last_lease_id:
            raise NotFound(
                f"lease {lease_id} is unknown: no such lease was ever issued (the newest is {self._last_lease_id})"
            )
        lease = self._leases.get(shard) if epoch == self.epoch else None
        if lease is None or (lease.member_id, lease.incarnation) != (member_id, incarnation):
            raise FailedPrecondition(
                f"{member_id}/{incarnation} does not hold shard {shard} of epoch {epoch}"
            )
        if lease_id and lease.lease_id and lease.lease_id != lease_id:
            raise FailedPrecondition(
                f"lease {lease_id} of shard {shard} was revoked; the shard is held under lease "
                f"{lease.lease_id}; ask for a new lease"
            )
        return lease

    def progress(
        self, member_id: str, incarnation: int, epoch: int, shard: int, offset: int,
        now: float = 0.0, lease_id: int = 0,
    ) -> int:
        """Records the offset reached and renews the lease; returns the samples newly trained."""
        if self._is_done(epoch, shard) and self._ever_held(member_id, epoch, shard):
            raise FailedPrecondition(f"shard {shard} of epoch {epoch} is already complete")
        lease = self._held(member_id, incarnation, epoch, shard, lease_id)
        if not lease.offset <= offset <= lease.shard.size:
            raise InvalidArgument(
                f"offset {offset} outside [{lease.offset}, {lease.shard.size}] for shard {shard}"
            )
        gained = offset - lease.offset
        lease.offset = offset
        self.dirty.add(shard)
        lease.deadline = max(lease.deadline, now + self.lease_timeout_s)
        return gained

    def complete(
        self, member_id: str, incarnation: int, epoch: int, shard: int, lease_id: int = 0
    ) -> tuple[int, bool]:
        """Counts the shard done. Returns (samples newly trained, whether the epoch ended)."""
        if self._is_done(epoch, shard) and self._ever_held(member_id, epoch, shard):
            self.duplicates_rejected += 1
            raise DuplicateCompletion(
                f"shard {shard} of epoch {epoch} was already completed; not counted again"
            )
        lease = self._held(member_id, incarnation, epoch, shard, lease_id)
        gained = lease.shard.size - lease.offset
        del self._leases[shard]
        self._done.add(shard)
        self.dirty.add(shard)
        self.completions.append(Completion(epoch, shard, member_id, incarnation))
        return gained, self._advance_if_done()

    def _is_done(self, epoch: int, shard: int) -> bool:
        return 0 <= shard < len(self.shards) and (
            0 <= epoch < self.epoch or (epoch == self.epoch and shard in self._done)
        )

    def _ever_held(self, member_id: str, epoch: int, shard: int) -> bool:
        """Whether ``member_id`` was ever granted (epoch, shard); a done shard that a member never
        held is reported to it as not held (``_held``), not as a duplicate."""
        return member_id in self._holders.get((epoch, shard), ())

    def requeue(self, member_id: str, died: bool = False) -> list[Lease]:
        """Puts every lease of ``member_id`` back at the front of the queue at its offset.

        With ``died``, the shard's failure count grows; a shard whose holders died
        ``max_attempts`` times is quarantined instead (skipped for the rest of the job) so that
        one poison shard cannot kill worker after worker forever. Quarantined leases are returned
        too; ``quarantined`` says which shards they are.
        """
        moved = [lease for lease in self._leases.values() if lease.member_id == member_id]
        for lease in moved:
            index = lease.shard.index
            del self._leases[index]
            self.dirty.add(index)
            if died:
                self._deaths[index] = self._deaths.get(index, 0) + 1
            if self.max_attempts and self._deaths.get(index, 0) >= self.max_attempts:
                self.quarantined.add(index)
                self._advance_if_done()
            else:
                self._pending.appendleft((index, lease.offset))
                self._front -= 1
                self._queued[index] = (self._front, lease.offset)
        self.reassignments += len(moved)
        return moved

    def _advance_if_done(self) -> bool:
        if len(self._done) + len(self.quarantined - self._done) < len(self.shards):
            return False
        self.epoch += 1
        self._done = set()
        # Holders of the epoch before the last are forgotten (the persisted state stays small):
        # a completion that late is answered "not held", as for anyone else, and counts nothing.
        self._holders = {k: v for k, v in self._holders.items() if k[0] >= self.epoch - 1}
        if not self.finished:
            self._refill(s.index for s in self.shards if s.index not in self.quarantined)
        self.dirty.update(range(len(self.shards)))
        return True

    # --- durability ------------------------------------------------------------------------------

    def counters(self) -> dict:
        """The ledger's own saved document (with format 3, the shards are rows of their own)."""
        return {
            "epoch": self.epoch,
            "last_lease_id": self._last_lease_id,
            "duplicates_rejected": self.duplicates_rejected,
            "reassignments": self.reassignments,
        }

    def shard_row(self, index: int) -> dict:
        """One shard's saved row: its place in the queue, its lease, whether it is done in this
        epoch, its deaths, and who held it in this epoch and the one before."""
        lease = self._leases.get(index)
        queued = self._queued.get(index)
        return {
            "pending": list(queued) if queued is not None else None,
            "lease": [lease.epoch, lease.member_id, lease.incarnation, lease.offset, lease.lease_id] if lease else None,
            "done": index in self._done,
            "deaths": self._deaths.get(index, 0),
            "quarantined": index in self.quarantined,
            "holders": [
                [e, m] for e in (self.epoch - 1, self.epoch) for m in sorted(self._holders.get((e, index), ()))
            ],
        }

    def to_state(self) -> dict:
        """Everything but the completion log (which the store appends row by row)."""
        return {
            "epoch": self.epoch,
            "pending": [list(p) for p in self._pending],
            "leases": [
                [lease.shard.index, lease.epoch, lease.member_id, lease.incarnation, lease.offset, lease.lease_id]
                for lease in self._leases.values()
            ],
            "last_lease_id": self._last_lease_id,
            "holders": [[e, i, m] for (e, i), members in self._holders.items() for m in sorted(members)],
            "done": sorted(self._done),
            "duplicates_rejected": self.duplicates_rejected,
            "reassignments": self.reassignments,
            "deaths": {str(k): v for k, v in self._deaths.items()},
            "quarantined": sorted(self.quarantined),
        }

    def restore(self, state: dict, completions: list[Completion], now: float = 0.0) -> None:
        """Replaces this ledger's progress with a saved one (same shards and epochs). Every lease
        gets a fresh deadline from ``now``: a holder counts its own from its last renewal before
        the restart, so it stops first."""
        self.epoch = state["epoch"]
        self._pending = deque((int(i), int(o)) for i, o in state["pending"])
        self._queued = {i: (position, o) for position, (i, o) in enumerate(self._pending)}
        self._front = 0
        self.dirty = set(range(len(self.shards)))
        self._leases = {}
        for i, e, m, inc, o, lease_id in state["leases"]:
            self._leases[int(i)] = Lease(
                int(e), self.shards[int(i)], m, int(inc), int(o), int(lease_id), now + self.lease_timeout_s
            )
        self._last_lease_id = max(
            [int(state["last_lease_id"]), *(lease.lease_id for lease in self._leases.values())]
        )
        self._holders = {}
        held = [*state["holders"], *([c.epoch, c.shard, c.member_id] for c in completions)]
        held += [[lease.epoch, lease.shard.index, lease.member_id] for lease in self._leases.values()]
        for e, i, m in held:
            if int(e) >= self.epoch - 1:
                self._holders.setdefault((int(e), int(i)), set()).add(m)
        self._done = {int(i) for i in state["done"]}
        self.duplicates_rejected = int(state["duplicates_rejected"])
        self.reassignments = int(state["reassignments"])
        self._deaths = {int(k): int(v) for k, v in state["deaths"].items()}
        self.quarantined = {int(i) for i in state["quarantined"]}
        self.completions = list(completions)
