"""The layout's parameter servers as the coordinator tracks them: which are ready, which were lost
and since when, the version each serves, and the fencing order that keeps a zombie worker's pushes
out. Pure bookkeeping; every decision takes ``now``. Not thread-safe: the Job's lock guards it.

Loss: a server of the layout that dies, leaves or re-registers is *lost* until it is ready again
(restarted from its checkpoint); no new lease is granted meanwhile, and one lost longer than
``recovery_timeout_s`` fails the job.

Fencing: each requeue after a worker's death bumps ``fence_version``; new leases wait until every
ready server has applied a roster at least that new (its heartbeat acknowledges the version), so a
fenced incarnation's pushes are refused before its shard moves on.
"""

from __future__ import annotations

from coordinator.state_codec import ServersRecord


class ServerFleet:
    def __init__(self, recovery_timeout_s: float) -> None:
        self.recovery_timeout_s = recovery_timeout_s
        self.ready: set[str] = set()
        self.versions: dict[str, int] = {}  # server -> newest version it reported while ready
        self.lost_at: dict[str, float] = {}
        self.fence_version = 0
        self.roster_acks: dict[str, int] = {}  # not saved: servers acknowledge again after a restart
        self.restarts = 0
        self.steps_rolled_back = 0

    def heard(self, server: str, version: int, roster_version: int) -> None:
        """A server's heartbeat: the version it serves and the roster it applied."""
        if server in self.ready:
            self.versions[server] = max(version, self.versions.get(server, 0))
        self.roster_acks[server] = roster_version

    def lose(self, server: str, now: float) -> None:
        self.ready.discard(server)
        self.lost_at.setdefault(server, now)

    def back(self, server: str, version: int) -> None:
        """A server is ready, serving ``version``; steps it restarted behind count as rolled back."""
        self.ready.add(server)
        self.lost_at.pop(server, None)
        last = self.versions.get(server, 0)
        if version < last:
            self.steps_rolled_back += last - version
        self.versions[server] = version

    def revoke(self) -> None:
        """A fenced incarnation may still push: every server must apply the next roster first."""
        self.fence_version += 1

    @property
    def revoking(self) -> bool:
        """Whether a revocation has not reached every ready server yet (new leases wait)."""
        return any(self.roster_acks.get(s, 0) < self.fence_version for s in self.ready)

    def overdue(self, now: float) -> list[str]:
        """Servers lost for longer than the recovery timeout."""
        return [s for s, since in self.lost_at.items() if now - since > self.recovery_timeout_s]

    def excuse(self, stall_s: float, now: float) -> None:
        """The coordinator stalled for ``stall_s``: lost servers get that time back."""
        for server, since in self.lost_at.items():
            self.lost_at[server] = min(since + stall_s, now)

    # --- durability ----------------------------------------------------------------------------

    def record(self) -> ServersRecord:
        return ServersRecord(
            ready=tuple(sorted(self.ready)),
            versions=dict(self.versions),
            lost=tuple(sorted(self.lost_at)),
            fence_version=self.fence_version,
            restarts=self.restarts,
            steps_rolled_back=self.steps_rolled_back,
        )

    def restore(self, record: ServersRecord, now: float) -> None:
        """A lost server's recovery clock restarts at ``now`` (monotonic time is not saved)."""
        self.ready = set(record.ready)
        self.versions = dict(record.versions)
        self.lost_at = {s: now for s in record.lost}
        self.fence_version = record.fence_version
        self.restarts = record.restarts
        self.steps_rolled_back = record.steps_rolled_back
