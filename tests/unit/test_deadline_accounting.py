"""Deadline hygiene counters: client calls that outlive their deadline or have none, and server
handlers that finish long after their client's deadline (what the chaos suite calls a hang)."""

from __future__ import annotations

import threading
import time

import grpc
from prometheus_client import CollectorRegistry

from lepton.deadline_guard import GUARD_SLACK_S, DeadlineGuard
from lepton.metrics import PAST_DEADLINE_SLACK_S, ClientCallStats, RpcMetricsInterceptor


def test_client_calls_are_counted_late_only_beyond_the_slack():
    stats = ClientCallStats()
    stats.record(timeout_s=5.0, elapsed_s=5.0 + PAST_DEADLINE_SLACK_S)  # on the edge: fine
    stats.record(timeout_s=5.0, elapsed_s=0.2)
    assert (stats.past_deadline, stats.without_deadline) == (0, 0)
    stats.record(timeout_s=5.0, elapsed_s=6.5)
    stats.record(timeout_s=None, elapsed_s=0.1)
    assert (stats.past_deadline, stats.without_deadline) == (1, 1)


class FakeContext:
    def __init__(self, remaining: float | None) -> None:
        self._remaining = remaining

    def time_remaining(self):
        return self._remaining

    def code(self):
        return grpc.StatusCode.OK


def test_a_handler_finishing_well_past_its_deadline_is_counted_by_method():
    registry = CollectorRegistry()
    interceptor = RpcMetricsInterceptor(registry)
    handler = interceptor._unary("/lepton.v1.Coordinator/LeaseShard", lambda request, context: "ok")
    for remaining in (3.0, None, -0.5, -(PAST_DEADLINE_SLACK_S + 0.5)):
        assert handler(object(), FakeContext(remaining)) == "ok"
    labels = {"service": "lepton.v1.Coordinator", "method": "LeaseShard"}
    assert registry.get_sample_value("lepton_rpc_server_past_deadline_total", labels) == 1.0
    assert registry.get_sample_value("lepton_rpc_server_handled_total", {**labels, "code": "OK"}) == 4.0


class FakeStream:
    def __init__(self) -> None:
        self.cancelled = threading.Event()

    def cancel(self) -> bool:
        self.cancelled.set()
        return True


def test_the_guard_cancels_a_stream_still_open_past_its_deadline_and_leaves_finished_ones():
    guard = DeadlineGuard()
    hung, finished = FakeStream(), FakeStream()
    started = time.monotonic()
    guard.watch(hung, timeout_s=0.1)
    guard.finished(guard.watch(finished, timeout_s=0.05))
    assert hung.cancelled.wait(5.0)
    assert time.monotonic() - started >= 0.1 + GUARD_SLACK_S
    assert guard.cancelled == 1 and not finished.cancelled.is_set()


class EndedCall:
    """A stream whose status arrived but whose pending receive never completed (the grpcio wait
    the guard exists for): cancel() does nothing, as on a real call that has ended."""

    def __init__(self) -> None:
        from grpc._cython import cygrpc

        self._state = type("State", (), {})()
        self._state.condition = threading.Condition()
        self._state.code = grpc.StatusCode.UNAVAILABLE
        self._state.due = {cygrpc.OperationType.receive_message}

    def cancel(self) -> bool:
        return False

    def next_response(self) -> grpc.StatusCode | None:  # what grpcio's _next waits for (bounded here)
        from grpc._cython import cygrpc

        with self._state.condition:
            woken = self._state.condition.wait_for(
                lambda: cygrpc.OperationType.receive_message not in self._state.due, timeout=10.0
            )
            return self._state.code if woken else None


def test_the_guard_wakes_an_iterator_waiting_on_a_call_that_already_ended():
    guard = DeadlineGuard()
    call = EndedCall()
    guard.watch(call, timeout_s=0.05)
    assert call.next_response() is grpc.StatusCode.UNAVAILABLE  # woken; would block forever otherwise
    assert guard.cancelled == 1
