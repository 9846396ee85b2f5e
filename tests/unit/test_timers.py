"""The one timer heap (lepton.timers) under the call watchdog and the deadline guard: callbacks run
in due order, once, never when cancelled, never before they are due, and one that raises does not
stop the others. Waits are on events with deadlines; the due times come from a fake clock."""

from __future__ import annotations

import threading

from lepton.timers import TimerHeap

WAIT_S = 10.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_callbacks_run_in_due_order_and_a_cancelled_one_never_runs():
    clock = FakeClock()
    timers = TimerHeap("test-timers", clock)
    ran: list[str] = []
    done = threading.Event()
    timers.schedule(30.0, lambda: ran.append("late"))
    dropped = timers.schedule(10.0, lambda: ran.append("dropped"))
    timers.schedule(20.0, lambda: ran.append("middle"))
    TimerHeap.cancel(dropped)
    assert timers.pending() == 2
    clock.now = 40.0  # all due now; the one below wakes the thread (it is the earliest)
    timers.schedule(-40.0, lambda: ran.append("first"))
    timers.schedule(-0.5, done.set)  # due after the others
    assert done.wait(WAIT_S)
    assert ran == ["first", "middle", "late"]
    assert timers.pending() == 0


def test_nothing_runs_before_it_is_due():
    clock = FakeClock()
    timers = TimerHeap("test-timers", clock)
    ran: list[str] = []
    early = threading.Event()
    timers.schedule(5.0, lambda: ran.append("due at 5"))
    timers.schedule(0.0, early.set)
    assert early.wait(WAIT_S)
    assert ran == [] and timers.pending() == 1  # the clock has not reached 5
    later = threading.Event()
    clock.now = 5.0
    timers.schedule(-1.0, later.set)  # due at 4: wakes the thread, which then finds both due
    assert later.wait(WAIT_S)
    finished = threading.Event()
    timers.schedule(0.0, finished.set)
    assert finished.wait(WAIT_S)
    assert ran == ["due at 5"]


def test_a_raising_callback_does_not_stop_the_others():
    timers = TimerHeap("test-timers")
    done = threading.Event()
    timers.schedule(0.0, lambda: 1 / 0)
    timers.schedule(0.01, done.set)
    assert done.wait(WAIT_S)


def test_the_watchdog_and_the_deadline_guard_share_the_timer_heap():
    from lepton.deadline_guard import DeadlineGuard
    from lepton.limits import Watchdog

    assert issubclass(Watchdog, TimerHeap)
    assert isinstance(DeadlineGuard()._timers, TimerHeap)
