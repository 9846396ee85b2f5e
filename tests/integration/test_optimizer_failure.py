"""An optimizer that raises on a parameter server mid-job fails the job with that reason at once,
instead of leaving it to idle in training until a timeout. Real servers on 127.0.0.1:0 in this
process; the optimizer is a test-only torch.optim class that raises at its third step (the
coordinator's proof step, on its own instance, passes)."""

from __future__ import annotations

import pytest
import torch

from lepton.clients import CoordinatorClient
from lepton.config import JobSpec
from lepton.process import EXIT_JOB_FAILED
from lepton.v1 import coordinator_pb2 as cpb
from support import job_events

from .conftest import start_cluster, stop_cluster
from .test_in_process_training import run_agents


class FailsAtThirdStep(torch.optim.SGD):
    """SGD that raises at its instance's third step."""

    def step(self, closure=None):
        self.steps_taken = getattr(self, "steps_taken", 0) + 1
        if self.steps_taken == 3:
            raise RuntimeError("injected failure at step 3")
        return super().step(closure)


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_step_that_raises_on_a_server_fails_the_job_with_its_reason(tmp_path, monkeypatch, mode):
    monkeypatch.setattr(torch.optim, "FailsAtThirdStep", FailsAtThirdStep, raising=False)
    spec = JobSpec(
        optimizer="failsatthirdstep", lr=0.1, mode=mode, epochs=50, shards_per_epoch=4, parameter_servers=2,
        heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0,
    )
    cluster = start_cluster(tmp_path, spec)
    try:
        # 50 epochs would take minutes; a job left to idle would outlive this deadline (the
        # servers' step timeouts and lease expiry only requeue and quarantine shards).
        agents, results, status = run_agents(cluster, 2, timeout_s=60)
        client = CoordinatorClient(cluster.coordinator)
        try:
            events = [e.message for e in job_events(client) if e.kind == cpb.EVENT_KIND_JOB_STATE_CHANGED]
        finally:
            client.close()
    finally:
        stop_cluster(cluster)
    assert status.state == cpb.JOB_STATE_FAILED
    assert "failsatthirdstep failed at update 3: RuntimeError: injected failure at step 3" in status.failure
    assert status.failure.startswith("parameter server ps-")
    assert any("injected failure" in message for message in events), events
    assert results == [EXIT_JOB_FAILED] * 2  # workers leave once the job is over, saying it failed
    assert status.shard_completions < spec.epochs * spec.shards_per_epoch
