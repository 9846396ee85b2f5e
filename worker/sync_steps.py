"""A worker's part in the servers' sync steps: joining them at a common version (JoinSteps on
every server) and leaving them (LeaveSteps), over the data path's fan-out."""

from __future__ import annotations

import threading
from collections.abc import Callable

import structlog

from lepton.errors import DeadlineExceeded, LeptonError
from worker.dataplane import ServerSet
from worker.lease import LeaseLost

log = structlog.get_logger("lepton.worker")

JOIN_ATTEMPTS = 5  # JoinSteps rounds before a sync worker joins by pushing instead
JOIN_POLL_S = 1.0  # the longest one JoinSteps call waits (a stop is noticed between calls)


class SyncSteps:
    """Whether this worker takes part in the servers' steps, and joining and leaving them.

    Args:
        servers: the data path (its fan-out, member and ``fresh`` flag).
        stop: set when the worker is asked to leave.
        now: a monotonic clock.
        join_timeout_s: the longest a join waits for a server that is behind.
    """

    def __init__(
        self, servers: ServerSet, stop: threading.Event, now: Callable[[], float], join_timeout_s: float
    ) -> None:
        self._servers = servers
        self._stop = stop
        self._now = now
        self._join_timeout_s = join_timeout_s
        self.participating = False  # servers wait for this worker's pushes: leave when idle
        self.join_polls = 0  # JoinSteps calls that ended before the server reached the target step

    def join(self) -> None:
        """Takes part from the same step on every server (JoinSteps at the highest version any
        server reports; if one has already passed it, leave everywhere and try again). Falls back
        to joining by pushing after a few refusals; errors propagate to the step's retry.

        A server answers once its version reaches the target, which can take a step's timeout.
        The worker waits in calls of at most JOIN_POLL_S (JoinSteps with the same from_version is
        safe to repeat), so that a stop (SIGTERM) is noticed within about a second: it leaves the
        steps and gives up the batch with LeaseLost, and the loop deregisters."""
        servers = self._servers
        member = servers.member
        assert member is not None
        layout = servers.ensure_layout()
        for attempt in range(1, JOIN_ATTEMPTS + 1):
            versions = servers.server_versions()
            target = max(versions.values())
            # Servers whose steps agree are at most one apart (the participants push every step to
            # all of them): they are joined at the highest version. A server two or more behind
            # counts its versions from elsewhere (it restarted from a checkpoint): its step J never
            # lines up with the others', so it is joined at its own open step instead.
            targets = {sid: target if target - v <= 1 else v for sid, v in versions.items()}
            self.participating = True  # from the first call on, leaving must run on any exit
            servers.fresh = False
            give_up = self._now() + self._join_timeout_s
            answers: dict[str, tuple[bool, int]] = {}
            while len(answers) < len(layout.servers):
                if self._stop.is_set():
                    self.leave()
                    raise LeaseLost  # leaving: the coordinator requeues the shard at the last offset
                remaining = give_up - self._now()
                if remaining <= 0:
                    # A server stays behind the target: a step there lost its last participant
                    # before anyone pushed it (one that died between its pushes to different
                    # servers), so nothing will move it. Joining by pushing moves it (the old,
                    # per-server join).
                    self.leave()
                    log.warning("join_steps_timed_out_joining_by_push", from_version=target)
                    return
                timeout_s = min(JOIN_POLL_S, remaining)

                def join(server, client, timeout_s=timeout_s, answers=answers, targets=targets, target=target):
                    if server.member_id in answers:
                        return server.member_id, answers[server.member_id]
                    try:
                        from_version = targets.get(server.member_id, target)
                        answer = client.join_steps(member, from_version, timeout_s=timeout_s)
                    except DeadlineExceeded:
                        self.join_polls += 1
                        return server.member_id, None  # not there yet: ask again
                    return server.member_id, answer

                try:
                    for server_id, answer in servers.fan_out(join):
                        if answer is not None:
                            answers[server_id] = answer
                except LeptonError:
                    self.leave()
                    raise
                if any(not joined for joined, _ in answers.values()):
                    break  # a server was already past the target
            if len(answers) == len(layout.servers) and all(joined for joined, _ in answers.values()):
                offset = {k: v for k, v in targets.items() if v != target}
                log.info("joined_steps", from_version=target, offset=offset, attempt=attempt)
                return
            self.leave()
            log.info("join_refused_retrying", from_version=target, versions=[v for _, v in answers.values()])
        log.warning("join_steps_gave_up", attempts=JOIN_ATTEMPTS)  # the push joins instead

    def leave(self) -> None:
        """Leaves the steps on every server, if taking part; a failure is logged (the servers drop
        a silent participant when its steps time out)."""
        if not self.participating:
            return
        member = self._servers.member
        if member is None:
            return

        def leave(server, client):
            client.leave_steps(member)

        try:
            self._servers.fan_out(leave)
        except LeptonError as exc:
            log.warning("leave_steps_failed", error=str(exc))
        self.participating = False
        self._servers.fresh = False
