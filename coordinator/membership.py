"""Who is in the job, and who has gone silent for too long.

A member's identity is (member id, incarnation). Registering again under a known id fences every
earlier incarnation. ``expire(now)`` is a pure decision: it returns who died and changes the table;
the caller acts on the result (requeueing leases, emitting events).

Liveness does not wait for the job: the table has its own small lock, which ``heartbeat`` takes
alone (never the job's lock) and every change of a member's liveness takes too, so a heartbeat
and a declaration of death are ordered. ``dirty`` names the members changed since the job last
collected them for a commit (coordinator/job_base.py).
"""

from __future__ import annotations

import itertools
import threading
from dataclasses import dataclass

from lepton.domain import Role
from lepton.errors import Fenced, InvalidArgument, NotFound


@dataclass
class Member:
    """One incarnation of a member and its liveness."""

    member_id: str
    incarnation: int
    role: Role
    address: str
    last_heartbeat: float
    alive: bool = True
    departed: bool = False
    hostname: str = ""
    pid: int = 0
    instance: str = ""  # container, pod or instance name, as the member reported it


class MembershipTable:
    """Registered members, keyed by id; only the latest incarnation of an id is kept.

    Raises NotFound for an unknown id or a never-issued incarnation, and Fenced for a dead or
    superseded one.
    """

    def __init__(self, heartbeat_timeout_s: float) -> None:
        if heartbeat_timeout_s <= 0:
            raise InvalidArgument("heartbeat_timeout_s must be > 0")
        self.heartbeat_timeout_s = heartbeat_timeout_s
        self._members: dict[str, Member] = {}
        self.fenced_rejections = 0  # requests refused because their incarnation was fenced
        self._counters = {Role.PARAMETER_SERVER: itertools.count(), Role.WORKER: itertools.count()}
        self.heartbeats_missed = 0  # heartbeat intervals that passed without one, over all members
        self.dirty: set[str] = set()  # member ids whose saved row is out of date
        self._liveness = threading.Lock()

    def register(
        self,
        role: Role,
        address: str,
        now: float,
        member_id: str = "",
        hostname: str = "",
        pid: int = 0,
        instance: str = "",
    ) -> Member:
        """Adds a new member, or a new incarnation of ``member_id`` (fencing the old one)."""
        previous = self._members.get(member_id) if member_id else None
        if previous is not None and previous.role is not role:
            raise InvalidArgument(
                f"member {member_id} registered as {previous.role.value}, not {role.value}"
            )
        if previous is None:
            if not member_id:
                member_id = self._fresh_id(role)
            incarnation = 1
        else:
            incarnation = previous.incarnation + 1
        member = Member(
            member_id, incarnation, role, address, last_heartbeat=now, hostname=hostname, pid=pid,
            instance=instance,
        )
        with self._liveness:
            self._members[member_id] = member
        self.dirty.add(member_id)
        return member

    def _fresh_id(self, role: Role) -> str:
        while True:
            candidate = f"{role.value}-{next(self._counters[role])}"
            if candidate not in self._members:
                return candidate

    def check(self, member_id: str, incarnation: int) -> Member:
        """The live member with this identity; raises NotFound or Fenced otherwise."""
        with self._liveness:
            return self._check(member_id, incarnation)

    def _check(self, member_id: str, incarnation: int) -> Member:
        member = self._members.get(member_id)
        if member is None:
            raise NotFound(f"no member {member_id!r} in this job; register first")
        if incarnation > member.incarnation:
            raise NotFound(
                f"member {member_id} incarnation {incarnation} is unknown: it was never issued (the latest "
                f"is {member.incarnation}); register first"
            )
        if incarnation != member.incarnation or not member.alive:
            self.fenced_rejections += 1
            why = "departed" if member.departed and incarnation == member.incarnation else (
                "declared dead" if incarnation == member.incarnation else
                f"superseded by incarnation {member.incarnation}"
            )
            raise Fenced(
                f"member {member_id} incarnation {incarnation} is fenced ({why}); re-register"
            )
        return member

    def heartbeat(self, member_id: str, incarnation: int, now: float, interval_s: float = 0.0) -> Member:
        """Renews a live member (also proof of life from progress and completions). With
        ``interval_s``, intervals that passed without a heartbeat count in ``heartbeats_missed``."""
        with self._liveness:
            member = self._check(member_id, incarnation)
            if interval_s > 0:
                self.heartbeats_missed += max(0, int((now - member.last_heartbeat) / interval_s) - 1)
            member.last_heartbeat = now
            return member

    def depart(self, member_id: str, incarnation: int) -> Member:
        """Marks a member as gone by its own choice (its incarnation is fenced from now on)."""
        with self._liveness:
            member = self._check(member_id, incarnation)
            member.alive = False
            member.departed = True
        self.dirty.add(member_id)
        return member

    def fence(self, member: Member) -> None:
        """Marks a member dead (its lease ran out): its incarnation is refused from now on."""
        with self._liveness:
            member.alive = False
        self.dirty.add(member.member_id)

    def expire(self, now: float, worker_timeout_s: float | None = None) -> list[Member]:
        """Declares dead every live member silent for longer than the timeout (for workers
        ``worker_timeout_s`` if given: coordinator/liveness.py); returns them."""
        dead = []
        timeouts = {
            Role.PARAMETER_SERVER: self.heartbeat_timeout_s,
            Role.WORKER: worker_timeout_s or self.heartbeat_timeout_s,
        }
        with self._liveness:
            for member in self._members.values():
                if member.alive and now - member.last_heartbeat > timeouts[member.role]:
                    member.alive = False
                    dead.append(member)
        self.dirty.update(m.member_id for m in dead)
        return dead

    def excuse(self, stall_s: float, now: float) -> None:
        """Forgives every live member ``stall_s`` seconds of silence: the coordinator itself was
        not listening then. No last heartbeat moves past ``now``."""
        with self._liveness:
            for member in self._members.values():
                if member.alive:
                    member.last_heartbeat = max(member.last_heartbeat, min(member.last_heartbeat + stall_s, now))

    def heard_since(self, member_id: str, incarnation: int) -> float | None:
        """The last heartbeat of this live incarnation, or None (unknown, fenced, superseded)."""
        member = self._members.get(member_id)
        if member is None or member.incarnation != incarnation or not member.alive:
            return None
        return member.last_heartbeat

    def get(self, member_id: str) -> Member | None:
        return self._members.get(member_id)

    def members(self, role: Role | None = None) -> list[Member]:
        return [m for m in self._members.values() if role is None or m.role is role]

    def alive(self, role: Role | None = None) -> list[Member]:
        return [m for m in self.members(role) if m.alive]

    # --- durability ------------------------------------------------------------------------------

    def row(self, member_id: str) -> list:
        """One member's saved row (what ``to_state`` lists)."""
        m = self._members[member_id]
        return [
            m.member_id, m.incarnation, m.role.value, m.address, m.alive, m.departed, m.hostname, m.pid,
            m.instance,
        ]

    def to_state(self) -> dict:
        """Members without their heartbeat times (monotonic clocks do not survive a restart)."""
        return {
            "members": [self.row(member_id) for member_id in self._members],
            "fenced_rejections": self.fenced_rejections,
        }

    def restore(self, state: dict, now: float) -> None:
        """Loads saved members; every live one gets twice the timeout from ``now`` to reattach
        (its channel may be in reconnect backoff when the coordinator comes back)."""
        members = {}
        for row in state["members"]:
            member_id, inc, role, address, alive, departed, hostname, pid = row[:8]
            instance = row[8] if len(row) > 8 else ""  # rows saved before instances: none
            members[member_id] = Member(
                member_id, int(inc), Role(role), address, last_heartbeat=now + self.heartbeat_timeout_s,
                alive=bool(alive), departed=bool(departed), hostname=hostname, pid=int(pid),
                instance=instance,
            )
        with self._liveness:
            self._members = members
            self.fenced_rejections = int(state["fenced_rejections"])
        self.dirty = set(members)
