"""The worker's heartbeat thread: it keeps the current incarnation alive and its lease renewed,
and notes what the coordinator answers (fencing, the layout version, the job's state).

It beats at the interval the coordinator's last reply directed (``HeartbeatReply.interval_s``,
coordinator/liveness.py), else at the job's. Beats travel on one long-lived HeartbeatStream
(``CoordinatorClient.beat``). A beat is skipped when another call that renews the member (a
lease, progress or completion) succeeded within the last interval, as the coordinator counts
those as proof of life too; but at most ``MAX_SKIPPED_BEATS`` in a row, and never so many that
the stream stays silent for ``MAX_SILENCE_S`` (the coordinator ends streams idle for its stream
idle time, 10 s by default), so the job's state and layout still arrive every few intervals."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from lepton.coordinator_client import CoordinatorClient
from lepton.domain import JobState, MemberId
from lepton.errors import Fenced, LeptonError
from worker.lease import LeaseClock

log = structlog.get_logger("lepton.worker")
MAX_SKIPPED_BEATS = 3
MAX_SILENCE_S = 5.0


def may_skip(renewed: float | None, last_beat: float, interval_s: float, skipped_in_a_row: int, now: float) -> bool:
    """Whether a beat due at ``now`` may be left out: another call renewed the member within the
    last interval (``renewed``: when it was sent), fewer than MAX_SKIPPED_BEATS were left out in a
    row, and the next beat still comes within MAX_SILENCE_S of the last one sent."""
    return (
        renewed is not None and now - renewed < interval_s and skipped_in_a_row < MAX_SKIPPED_BEATS
        and now + interval_s - last_beat <= MAX_SILENCE_S
    )


class Heartbeat:
    """Beats every ``interval_s`` on a thread until ``job_over`` is set (by the job's end, or by
    the agent once it returns). ``fenced`` is set when the coordinator fences the incarnation
    beating (and cleared by the agent when it registers anew); ``layout_seen`` is the newest
    layout version and ``state`` the job's state of the last answer."""

    def __init__(
        self, coordinator: CoordinatorClient, member: Callable[[], MemberId | None], lease: LeaseClock
    ) -> None:
        self._coord = coordinator
        self._member = member
        self._lease = lease
        self.fenced = threading.Event()
        self.job_over = threading.Event()
        self.state: JobState | None = None
        self.layout_seen = 0
        self.skipped = 0  # beats left out because another call had just renewed the member
        # The coordinator's directed interval over the job's own (>= 1 when it asks for fewer
        # beats, at scale); the worker slows its progress reports by the same factor.
        self.slowdown = 1.0

    def start(self, interval_s: float) -> None:
        threading.Thread(target=self._run, args=(interval_s,), name="heartbeat", daemon=True).start()

    def _run(self, interval_s: float) -> None:
        job_interval_s = interval_s
        failures = 0
        skipped_in_a_row = 0
        last_beat = time.monotonic()
        # Beats on after a stop is asked for (a SIGTERM while loading data and model must not let
        # the member be declared dead before it deregisters) until the agent returns.
        while not self.job_over.wait(interval_s):
            member = self._member()
            if member is None or self.fenced.is_set():
                continue
            sent = self._lease.now()
            if may_skip(self._coord.renewal_sent(member), last_beat, interval_s, skipped_in_a_row, time.monotonic()):
                skipped_in_a_row += 1
                self.skipped += 1
                continue
            skipped_in_a_row = 0
            last_beat = time.monotonic()
            try:
                reply = self._coord.beat(member)
                failures = 0
                if member == self._member():
                    self._lease.renewed(sent)  # a heartbeat renews the member's leases
            except Fenced as exc:
                if member == self._member():
                    log.warning("worker_fenced", reason=str(exc))
                    self.fenced.set()
                continue
            except LeptonError as exc:
                failures += 1
                if failures == 1 or failures % 20 == 0:
                    log.warning("heartbeat_failed", error=str(exc), failures=failures)
                continue
            if reply.interval_s > 0:
                interval_s = reply.interval_s
                self.slowdown = max(1.0, interval_s / job_interval_s)
            self.layout_seen = max(self.layout_seen, reply.layout_version)
            self.state = reply.state
            if reply.state.terminal:
                self.job_over.set()

    def final_state(self) -> JobState | None:
        """The job's terminal state: asked once more (the last beat may predate the end), else
        the last one a beat reported."""
        member = self._member()
        if member is not None and not self.fenced.is_set():
            try:
                self.state = self._coord.heartbeat(member).state
            except LeptonError as exc:
                log.warning("final_state_unknown", error=str(exc))
        return self.state
