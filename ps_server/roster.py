"""The workers a parameter server accepts pushes from, as last published by the coordinator."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lepton.errors import Fenced, NotFound


@dataclass(frozen=True)
class WorkerEntry:
    member_id: str
    incarnation: int
    alive: bool


class WorkerRoster:
    """Fences requests against the coordinator's view of workers.

    ``check`` returns True when the identity is current and live, raises Fenced when it is known to
    be dead or superseded, and returns False when the roster may simply be out of date (unknown id,
    or a newer incarnation than we know): the caller refreshes and calls ``check_final``.
    """

    def __init__(self) -> None:
        self._workers: dict[str, WorkerEntry] = {}
        self.fenced_rejections = 0

    def update(self, entries: Iterable[WorkerEntry]) -> set[str]:
        """Replaces the view; returns the ids of live workers."""
        self._workers = {e.member_id: e for e in entries}
        return {e.member_id for e in self._workers.values() if e.alive}

    def live(self) -> set[str]:
        return {e.member_id for e in self._workers.values() if e.alive}

    def check(self, member_id: str, incarnation: int) -> bool:
        entry = self._workers.get(member_id)
        if entry is None or incarnation > entry.incarnation:
            return False
        if incarnation < entry.incarnation or not entry.alive:
            self.fenced_rejections += 1
            raise Fenced(
                f"worker {member_id} incarnation {incarnation} is fenced by the coordinator; "
                "re-register"
            )
        return True

    def check_final(self, member_id: str, incarnation: int) -> None:
        if not self.check(member_id, incarnation):
            raise NotFound(f"{member_id} incarnation {incarnation} is not a worker of this job")
