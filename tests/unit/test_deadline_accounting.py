"""Deadline hygiene counters: client calls that outlive their deadline or have none, and server
handlers that finish long after their client's deadline (what the chaos suite calls a hang)."""

from __future__ import annotations

import grpc
from prometheus_client import CollectorRegistry

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
