"""Prometheus view of a worker, read at scrape time."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, SummaryMetricFamily
from prometheus_client.registry import Collector

from worker.agent import WorkerAgent


class WorkerCollector(Collector):
    def __init__(self, agent: WorkerAgent) -> None:
        self._agent = agent

    def collect(self) -> Iterator:
        a = self._agent
        for name, text, value in [
            ("lepton_worker_steps_total", "Batches trained through the parameter servers.", a.steps),
            ("lepton_worker_samples_total", "Training samples trained.", a.samples),
            ("lepton_worker_shards_completed_total", "Shards this worker completed.", a.shards_completed),
            ("lepton_worker_stale_steps_total", "Sync steps found closed (batch recomputed).", a.stale_steps),
            (
                "lepton_worker_registrations_total",
                "Registrations (1 + re-registrations after fencing).",
                a.registrations,
            ),
            ("lepton_worker_pushed_bytes_total", "Gradient bytes pushed (as sent).", a.bytes_pushed),
            (
                "lepton_worker_pushes_during_backward_total",
                "Push-pulls to one server begun from a backward hook (overlap).",
                a.pushes_during_backward,
            ),
            ("lepton_worker_pulled_bytes_total", "Parameter bytes pulled.", a.bytes_pulled),
            # Deprecated names, kept for one release (docs/observability.md).
            ("lepton_worker_bytes_pushed_total", "Deprecated: lepton_worker_pushed_bytes_total.", a.bytes_pushed),
            ("lepton_worker_bytes_pulled_total", "Deprecated: lepton_worker_pulled_bytes_total.", a.bytes_pulled),
            (
                "lepton_worker_lease_pauses_total",
                "Times training paused because its lease was overdue for renewal.",
                a.lease_pauses,
            ),
        ]:
            yield CounterMetricFamily(name, text, value=value)
        yield SummaryMetricFamily(
            "lepton_worker_push_seconds",
            "Latency of push-pulls answered by every server (one per batch attempt), seconds.",
            count_value=a.pushes,
            sum_value=a.push_seconds,
        )
