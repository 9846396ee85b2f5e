"""The progress reporter keeps the newest offset until the coordinator takes it."""

import threading
import time

import pytest

from lepton.domain import HeartbeatReply, JobState, MemberId
from lepton.errors import FailedPrecondition, Fenced, Unavailable
from worker.heartbeat import Heartbeat
from worker.lease import LeaseClock
from worker.progress import ProgressReporter


class Coordinator:
    def __init__(self):
        self.reports = []
        self.fail_with = None

    def send(self, epoch, shard, offset, loss, samples):
        if self.fail_with is not None:
            raise self.fail_with
        self.reports.append((epoch, shard, offset, round(loss, 6), samples))


def reporter(coordinator):
    return ProgressReporter(coordinator.send, interval_s=3600.0)  # the thread never fires in a test


def test_a_failed_report_is_superseded_by_the_next_with_all_samples():
    c = Coordinator()
    r = reporter(c)
    r.begin(epoch=1, shard=4, offset=10)
    r.update(offset=20, loss=1.0, samples=10)
    c.fail_with = Unavailable("coordinator restarting")
    assert r.flush() is False
    r.update(offset=30, loss=3.0, samples=10)
    c.fail_with = None
    assert r.flush() is True
    assert c.reports == [(1, 4, 30, 2.0, 20)]
    assert r.flush() is True and len(c.reports) == 1  # nothing new: nothing sent
    assert r.end() == (0.0, 0)
    r.close()


def test_unreported_samples_are_handed_to_the_completion():
    c = Coordinator()
    r = reporter(c)
    r.begin(0, 0, 0)
    r.update(8, 0.5, 8)
    r.flush()
    r.update(16, 1.5, 8)
    assert r.end() == (1.5, 8)
    r.close()


def test_a_refused_lease_and_fencing_are_flagged_for_the_training_loop():
    c = Coordinator()
    r = reporter(c)
    r.begin(0, 0, 0)
    r.update(8, 0.5, 8)
    c.fail_with = FailedPrecondition("does not hold shard 0")
    r.flush()
    assert r.lost.is_set() and not r.fenced.is_set()
    r.begin(0, 1, 0)
    assert not r.lost.is_set()
    r.update(4, 0.5, 4)
    c.fail_with = Fenced("declared dead")
    r.flush()
    assert r.fenced.is_set()
    r.close()


def test_a_new_lease_clears_the_fenced_flag_of_the_previous_incarnation():
    c = Coordinator()
    r = reporter(c)
    r.begin(0, 0, 0)
    r.update(4, 0.5, 4)
    c.fail_with = Fenced("declared dead")
    r.flush()
    assert r.fenced.is_set()
    r.begin(0, 3, 0)  # after re-registering, a fresh lease
    assert not r.fenced.is_set() and not r.lost.is_set()
    r.close()


def test_the_interval_is_read_before_every_wait_so_a_directed_slowdown_takes_effect():
    c = Coordinator()
    asked = threading.Semaphore(0)

    def interval() -> float:
        asked.release()
        return 0.01

    r = ProgressReporter(c.send, interval)
    try:
        for _ in range(3):
            assert asked.acquire(timeout=10), "the reporter stopped reading its interval"
    finally:
        r.close()


class DirectingCoordinator:
    """Answers every beat with the interval a coordinator of many workers directs."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.beats = 0

    def renewal_sent(self, member):
        return None

    def beat(self, member):
        self.beats += 1
        return HeartbeatReply(JobState.TRAINING, layout_version=1, interval_s=self.interval_s)


def test_a_directed_heartbeat_interval_slows_progress_reports_by_the_same_factor():
    coordinator = DirectingCoordinator(interval_s=0.05)
    heartbeat = Heartbeat(coordinator, lambda: MemberId("worker-0", 1), LeaseClock())
    assert heartbeat.slowdown == 1.0
    heartbeat.start(0.01)  # the job's interval; the coordinator asks for 5x that
    try:
        deadline = time.monotonic() + 10
        while heartbeat.slowdown == 1.0 and time.monotonic() < deadline:
            heartbeat.job_over.wait(0.01)
        assert heartbeat.slowdown == pytest.approx(5.0)
    finally:
        heartbeat.job_over.set()
