"""Prometheus view of the coordinator's job, read at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from coordinator.job import Job
from coordinator.membership import Role
from lepton.wire import VALIDATION_METRICS


class JobCollector(Collector):
    def __init__(self, job: Job, clock: Callable[[], float] = time.monotonic) -> None:
        self._job = job
        self._clock = clock

    def collect(self) -> Iterator:
        job = self._job
        s = job.status(self._clock())
        members = GaugeMetricFamily(
            "lepton_members", "Members of the job by role and liveness.", labels=["role", "alive"]
        )
        for role in Role:
            for alive in (True, False):
                n = sum(1 for m in s.members if m.member.role is role and m.member.alive is alive)
                members.add_metric([role.value, str(alive).lower()], n)
        yield members
        yield GaugeMetricFamily(
            "lepton_job_state",
            "Job state (1 waiting, 2 initializing, 3 training, 4 evaluating, 5 succeeded, 6 failed).",
            value=s.state.value,
        )
        yield GaugeMetricFamily("lepton_job_epoch", "Current epoch, 0-based.", value=s.epoch)
        yield GaugeMetricFamily(
            "lepton_shards_pending", "Shards of the current epoch waiting for a worker.", value=s.shards_pending
        )
        yield GaugeMetricFamily(
            "lepton_shards_in_lease", "Shards of the current epoch leased right now.", value=s.shards_leased
        )
        yield from validation_metrics(s.validation)
        for name, text, value in [
            ("lepton_shards_leased_total", "Shard leases granted.", job.leases_granted),
            (
                "lepton_shards_completed_total",
                "Shard completions counted (once per epoch and shard).",
                s.shard_completions,
            ),
            (
                "lepton_shards_reassigned_total",
                "Leases returned to the queue by a death or departure.",
                s.reassignments,
            ),
            (
                "lepton_duplicate_completions_rejected_total",
                "Completions rejected because the shard was already done.",
                s.duplicate_completions_rejected,
            ),
            (
                "lepton_members_declared_dead_total",
                "Members declared dead after the heartbeat timeout.",
                s.members_declared_dead,
            ),
            (
                "lepton_heartbeats_missed_total",
                "Heartbeat intervals that passed without a heartbeat from a member that later came back.",
                job.heartbeats_missed,
            ),
            (
                "lepton_stale_requests_rejected_total",
                "Requests refused because their incarnation was fenced.",
                job.fenced_rejections,
            ),
            ("lepton_samples_trained_total", "Training samples reported by workers.", s.samples_trained),
            (
                "lepton_state_saves_failed_total",
                "Changes the state directory refused to commit (rolled back; callers got UNAVAILABLE).",
                job.saves_failed,
            ),
        ]:
            yield CounterMetricFamily(name, text, value=value)


def validation_metrics(rows) -> Iterator:  # type: ignore[no-untyped-def]
    """The validation history's Prometheus view: how many, and the newest one's epoch and metrics."""
    yield CounterMetricFamily(
        "lepton_validations_total",
        "Validations on the test split recorded (the final evaluation included when it covers a new epoch).",
        value=len(rows),
    )
    if not rows:
        return
    last = rows[-1]
    yield GaugeMetricFamily(
        "lepton_validation_epoch", "Epoch (0-based) the newest validation followed.", value=last.epoch
    )
    latest = GaugeMetricFamily(
        "lepton_validation_metric", "The newest validation's metrics on the test split, by metric.", labels=["metric"]
    )
    for metric in VALIDATION_METRICS:
        value = getattr(last.evaluation, metric)
        if value is not None:
            latest.add_metric([metric], value)
    yield latest
