"""Prometheus view of a parameter server, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from ps_server.gate import STALENESS_BUCKETS
from ps_server.parameter_server import ParameterServer


class ParameterServerCollector(Collector):
    def __init__(self, server: ParameterServer) -> None:
        self._server = server

    def collect(self) -> Iterator:
        server = self._server
        s = server.status()
        yield GaugeMetricFamily(
            "lepton_ps_version", "Updates applied to this server's parameters (its version).", value=s.version
        )
        yield CounterMetricFamily(
            "lepton_ps_updates_applied_total", "Optimizer steps applied.", value=s.updates_applied
        )
        pushes = CounterMetricFamily("lepton_ps_pushes_total", "Pushes by outcome.", labels=["outcome"])
        pushes.add_metric(["received"], s.pushes_received)
        pushes.add_metric(["stale"], s.pushes_stale)
        pushes.add_metric(["rejected"], s.pushes_rejected)
        yield pushes
        for name, old, text, value in (
            ("lepton_ps_pulled_bytes_total", "lepton_ps_bytes_pulled_total", "Parameter bytes sent to workers.",
             s.bytes_pulled),
            ("lepton_ps_pushed_bytes_total", "lepton_ps_bytes_pushed_total", "Gradient bytes received (as sent).",
             s.bytes_pushed),
        ):
            yield CounterMetricFamily(name, text, value=value)
            yield CounterMetricFamily(old, f"Deprecated: {name} (removed in the next release).", value=value)
        yield CounterMetricFamily(
            "lepton_ps_sync_steps_timed_out_total",
            "Sync steps closed by the timeout, and (ssp) slow workers dropped after the timeout.",
            value=s.steps_timed_out,
        )
        yield CounterMetricFamily(
            "lepton_ps_checkpoints_failed_total", "Periodic checkpoints that could not be written (training went on).",
            value=s.checkpoints_failed,
        )
        yield CounterMetricFamily(
            "lepton_ps_stale_requests_rejected_total", "Requests refused because the worker's incarnation is fenced.",
            value=server.fenced_rejections,
        )
        gate = server.gate_or_none()
        if gate is not None:
            c = gate.counters
            buckets = [(str(b), c.staleness_le[i]) for i, b in enumerate(STALENESS_BUCKETS)]
            buckets.append(("+Inf", c.staleness_count))
            yield HistogramMetricFamily(
                "lepton_ps_staleness_updates",
                "Staleness of applied async gradients, in updates (server version at apply minus base version).",
                buckets=buckets,
                sum_value=c.staleness_sum,
            )
