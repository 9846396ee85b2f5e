"""The job's event log: a bounded, sequence-numbered history that watchers can block on."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

EVENT_RETENTION = 10_000  # events kept in memory and in the coordinator's store


class EventKind(Enum):
    MEMBER_REGISTERED = 1
    MEMBER_DECLARED_DEAD = 2
    MEMBER_DEPARTED = 3
    SHARD_LEASED = 4
    SHARD_COMPLETED = 5
    SHARD_REQUEUED = 6
    DUPLICATE_COMPLETION_REJECTED = 7
    EPOCH_STARTED = 8
    JOB_STATE_CHANGED = 9
    EVALUATED = 10
    SHARD_QUARANTINED = 11
    CHECKPOINT_REQUESTED = 12
    CHECKPOINT_COMPLETED = 13
    CHECKPOINT_FAILED = 14
    EVALUATION_DECLINED = 15
    VALIDATED = 16


@dataclass(frozen=True)
class Event:
    sequence: int
    time_unix_s: float
    kind: EventKind
    message: str
    member_id: str = ""
    incarnation: int = 0
    epoch: int = 0
    shard: int = 0
    offset: int = 0
    job_state: str = ""
    loss: float = 0.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """A JSON-ready form (for the coordinator's store)."""
        return {**dataclasses.asdict(self), "kind": self.kind.name}

    @classmethod
    def from_dict(cls, body: dict) -> Event:
        return cls(**{**body, "kind": EventKind[body["kind"]]})


class EventLog:
    """Appends events and lets readers wait for ones after a sequence number.

    Keeps the newest ``retention`` events; a reader that falls further behind skips the gap. With
    ``staged=True`` appended events stay invisible until ``publish()``: the job commits them
    (``staged()``) in the same transaction as the state change they describe and publishes only
    after that, so no watcher ever sees an event that a crash could take back, and a restarted
    coordinator ``restore()``s the committed history: a watcher that resumes from the last sequence
    it saw misses nothing, even events that were published but never delivered before a SIGKILL.
    """

    def __init__(
        self, retention: int = EVENT_RETENTION, wall_clock=time.time, next_sequence: int = 1, staged: bool = False
    ) -> None:
        self._events: deque[Event] = deque(maxlen=retention)
        self._staged: list[Event] | None = [] if staged else None
        self._next = next_sequence
        self._cond = threading.Condition()
        self._wall_clock = wall_clock
        self._closed = False

    def append(self, kind: EventKind, message: str, **fields: object) -> Event:
        with self._cond:
            event = Event(self._next, self._wall_clock(), kind, message, **fields)  # type: ignore[arg-type]
            self._next += 1
            if self._staged is not None:
                self._staged.append(event)
            else:
                self._events.append(event)
                self._cond.notify_all()
            return event

    def staged(self) -> list[Event]:
        """Events appended but not yet published (what the next commit must carry)."""
        with self._cond:
            return list(self._staged or ())

    def restore(self, history: list[Event]) -> None:
        """After a restart: the committed history (oldest first) becomes readable again."""
        with self._cond:
            self._events.extend(history)
            if history:
                self._next = max(self._next, history[-1].sequence + 1)
            self._cond.notify_all()

    def publish(self, through: int | None = None) -> None:
        """Makes staged events visible to readers: all of them, or those up to sequence
        ``through`` (the ones a commit carried; later ones wait for theirs)."""
        with self._cond:
            if self._staged:
                count = len(self._staged) if through is None else sum(
                    1 for e in self._staged if e.sequence <= through
                )
                if count:
                    self._events.extend(self._staged[:count])
                    del self._staged[:count]
                    self._cond.notify_all()

    def discard_staged(self) -> None:
        """Drops the staged events of a change that was not committed (nobody has seen them) and
        hands their sequence numbers out again."""
        with self._cond:
            if self._staged:
                self._next = self._staged[0].sequence
                self._staged.clear()

    def after(self, sequence: int) -> list[Event]:
        with self._cond:
            return [e for e in self._events if e.sequence > sequence]

    def wait_after(self, sequence: int, timeout_s: float) -> list[Event]:
        """Events after ``sequence``, waiting up to ``timeout_s`` for at least one."""
        with self._cond:
            self._cond.wait_for(
                lambda: self._closed or (self._events and self._events[-1].sequence > sequence),
                timeout=timeout_s,
            )
            return [e for e in self._events if e.sequence > sequence]

    def close(self) -> None:
        """Wakes every waiter (on shutdown)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def next_sequence(self) -> int:
        with self._cond:
            return self._next

    def resume_from(self, next_sequence: int) -> None:
        """After a restart: keep sequence numbers increasing across coordinator lifetimes."""
        with self._cond:
            self._next = max(self._next, next_sequence)

    @property
    def closed(self) -> bool:
        return self._closed
