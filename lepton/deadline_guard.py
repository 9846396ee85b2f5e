"""The client side's deadline guard: one thread that ends response streams still open after their
deadline. ``lepton.rpc.iterate`` registers each stream it reads; ``lepton.metrics`` counts what the
guard ended."""

from __future__ import annotations

from typing import Any

import structlog

from lepton.timers import Timer, TimerHeap

log = structlog.get_logger("lepton.rpc")


class DeadlineGuard:
    """One thread that ends response streams still open ``GUARD_SLACK_S`` after their deadline.

    A defence in depth, not the deadline itself. The gRPC core ends a call at its deadline, but
    grpcio's response iterator (``_MultiThreadedRendezvous._next``) has been seen waiting forever
    on a call that already has its final status: a bidirectional PushPull to a parameter server
    that was cut off by a network partition, healed and shut down while the call was open (in
    about half of such runs here). The status had arrived, but the pending receive operation's
    completion never did, and the iterator waits for both (compare grpc/grpc#20562). Then
    ``cancel()`` does nothing (the call is over), so the guard removes that receive operation from
    the call's pending set and wakes the iterator, which raises the call's own status. That touches
    grpcio internals (checked against 1.85); if they change, the guard logs that it could not help.
    ``cancelled`` counts the streams it ended either way.
    """

    def __init__(self) -> None:
        self._timers = TimerHeap("deadline-guard")
        self.cancelled = 0

    def watch(self, call: Any, timeout_s: float) -> Timer:
        return self._timers.schedule(timeout_s + GUARD_SLACK_S, lambda: self._end(call))

    @staticmethod
    def finished(entry: Timer) -> None:
        TimerHeap.cancel(entry)

    def _end(self, call: Any) -> None:
        if call.cancel():
            how = "cancelled"
        elif _wake_finished_stream(call):
            how = "woken"
        else:
            log.error("stream_stuck_past_deadline", slack_s=GUARD_SLACK_S)
            return
        self.cancelled += 1
        log.warning("stream_ended_past_deadline", how=how, slack_s=GUARD_SLACK_S)


def _wake_finished_stream(call: Any) -> bool:
    """Wakes a response iterator waiting for a receive completion on a call that has ended."""
    try:
        from grpc._cython import cygrpc

        state = call._state
        with state.condition:
            if state.code is None or cygrpc.OperationType.receive_message not in state.due:
                return False
            state.due.discard(cygrpc.OperationType.receive_message)
            state.condition.notify_all()
        return True
    except (AttributeError, ImportError):  # grpcio internals moved
        return False


GUARD_SLACK_S = 0.5
DEADLINE_GUARD = DeadlineGuard()
