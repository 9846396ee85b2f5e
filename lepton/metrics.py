"""Prometheus metrics: per-process registries, the RPC interceptor, and the HTTP endpoint.

Every role builds its own ``CollectorRegistry`` (several roles may share one process in tests);
domain counters are read at scrape time by each role's collector, so domain code never imports
prometheus_client. Names follow Prometheus conventions: ``lepton_`` prefix, base units (seconds,
bytes), ``_total`` for counters, and labels with bounded values (service, method, code, role).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from lepton.deadline_guard import DEADLINE_GUARD
from lepton.handler_rewrap import rewrap

RPC_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# A call or handler that ends this long after its deadline counts as one that outlived it (a hang).
PAST_DEADLINE_SLACK_S = 1.0


def left_because(remaining_s: float | None) -> grpc.StatusCode:
    """Why a client left a call, from the server's time remaining when it noticed: its deadline
    (DEADLINE_EXCEEDED) or a cancel. The server counts the deadline from the call's arrival, so it
    ends up to the transit time after the client's: a call that ends within the slack of its
    deadline counts as one that ran out of time."""
    if remaining_s is not None and remaining_s <= PAST_DEADLINE_SLACK_S:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class ClientCallStats:
    """Process-wide client-side deadline hygiene, counted by ``lepton.rpc.call``: unary calls made
    without a deadline, and calls that returned more than the slack after theirs. A process that
    was itself stopped (SIGSTOP) while waiting counts its own calls as late: its clock ran on."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.without_deadline = 0
        self.past_deadline = 0

    def record(self, timeout_s: float | None, elapsed_s: float) -> None:
        if timeout_s is None:
            with self._lock:
                self.without_deadline += 1
        elif elapsed_s > timeout_s + PAST_DEADLINE_SLACK_S:
            with self._lock:
                self.past_deadline += 1


CLIENT_CALLS = ClientCallStats()


class ClientCallCollector(Collector):
    def collect(self) -> Iterator:
        yield CounterMetricFamily(
            "lepton_rpc_client_cancelled_past_deadline",
            "Response streams of this process still open 0.5 s after their deadline, cancelled by the deadline guard.",
            value=DEADLINE_GUARD.cancelled,
        )
        yield CounterMetricFamily(
            "lepton_rpc_client_past_deadline",
            "Unary calls of this process that returned more than 1 s after their deadline.",
            value=CLIENT_CALLS.past_deadline,
        )
        yield CounterMetricFamily(
            "lepton_rpc_client_without_deadline",
            "Unary calls of this process made without a deadline.",
            value=CLIENT_CALLS.without_deadline,
        )


class LimitCollector(Collector):
    """The server's call limits (``lepton.limits.Admission``), read at scrape time: calls refused
    and streams ended, by method, class and reason; calls in flight and the limit, by class."""

    def __init__(self, admission: Any) -> None:
        self._admission = admission

    def collect(self) -> Iterator:
        a = self._admission
        labels = ["service", "method", "rpc_class", "reason"]
        rejected = CounterMetricFamily(
            "lepton_rpc_server_rejected",
            "Calls refused with RESOURCE_EXHAUSTED: their class was at its limit (class_limit) or their "
            "connection at its share of it (peer_share).",
            labels=labels,
        )
        ended = CounterMetricFamily(
            "lepton_rpc_server_streams_ended",
            "Streams the server ended with DEADLINE_EXCEEDED: no request message within the idle time "
            "(idle) or older than the stream lifetime (lifetime).",
            labels=labels,
        )
        for family, counts in zip((rejected, ended), a.counts(), strict=True):
            for (full_method, name, reason), n in sorted(counts.items()):
                service, _, method = full_method.lstrip("/").partition("/")
                family.add_metric([service, method, name, reason], n)
        yield rejected
        yield ended
        in_flight = GaugeMetricFamily(
            "lepton_rpc_server_class_in_flight", "Calls admitted and not yet finished, by class.", labels=["rpc_class"]
        )
        limit = GaugeMetricFamily(
            "lepton_rpc_server_class_limit", "Concurrent calls each class admits (--rpc-limit).", labels=["rpc_class"]
        )
        for name, n in sorted(a.in_flight().items()):
            in_flight.add_metric([name], n)
        for c in a.limits.classes:
            limit.add_metric([c.name], c.limit)
        yield in_flight
        yield limit


class RpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by service, method and status code and times it."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.started = Counter(
            "lepton_rpc_server_started_total",
            "RPCs whose handler the server started, by method (in flight: started minus handled).",
            ["service", "method"],
            registry=registry,
        )
        self.handled = Counter(
            "lepton_rpc_server_handled_total",
            "RPCs completed by the server, by method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.seconds = Histogram(
            "lepton_rpc_server_handling_seconds",
            "Time from receiving an RPC to its last response, by method.",
            ["service", "method"],
            buckets=RPC_BUCKETS_S,
            registry=registry,
        )
        self.past_deadline = Counter(
            "lepton_rpc_server_past_deadline",
            "Handlers that finished more than 1 s after their client's deadline (requests that hung).",
            ["service", "method"],
            registry=registry,
        )

    def _observe(self, full_method: str, context: grpc.ServicerContext, start: float, failed: bool) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        remaining = context.time_remaining() if hasattr(context, "time_remaining") else None
        if remaining is not None and remaining < -PAST_DEADLINE_SLACK_S:
            self.past_deadline.labels(service, method).inc()
        code = context.code() if hasattr(context, "code") else None
        if code is None and hasattr(context, "is_active") and not context.is_active():
            # The client left (cancelled, or its deadline passed): whatever the handler did then
            # is not a server error and is counted under the client's own reason.
            code = left_because(remaining)
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self.handled.labels(service, method, name).inc()
        self.seconds.labels(service, method).observe(time.perf_counter() - start)

    def _started(self, full_method: str) -> None:
        service, _, method = full_method.lstrip("/").partition("/")
        self.started.labels(service, method).inc()

    def _unary(self, full_method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
            self._started(full_method)
            start = time.perf_counter()
            failed = True
            try:
                result = fn(request, context)
                failed = False
                return result
            finally:
                self._observe(full_method, context, start, failed)

        return wrapped

    def _stream(self, full_method: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
        def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            self._started(full_method)
            start = time.perf_counter()
            failed = True
            try:
                yield from fn(request, context)
                failed = False
            finally:
                self._observe(full_method, context, start, failed)

        return wrapped

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        m = handler_call_details.method
        return rewrap(handler, lambda fn: self._unary(m, fn), lambda fn: self._stream(m, fn))


class MetricsEndpoint:
    """An HTTP /metrics endpoint for one registry; port 0 picks a free port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.address = f"{host}:{self._httpd.server_port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
