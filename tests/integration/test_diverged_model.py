"""A model that diverged (its evaluation loss is NaN) ends the job as FAILED with the reason, and
every worker exits EXIT_JOB_FAILED, instead of the job staying in EVALUATING while each worker
that tries to evaluate has its result refused and exits as if it lost contact."""

from __future__ import annotations

import threading

from lepton.clients import CoordinatorClient
from lepton.config import JobSpec
from lepton.process import EXIT_JOB_FAILED
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from worker.agent import WorkerAgent

from .conftest import start_cluster, stop_cluster
from .test_in_process_training import run_agents


def test_a_diverged_model_fails_the_job_with_the_reason_and_workers_exit_job_failed(tmp_path):
    spec = JobSpec(
        dataset="integration.custom_workload:blobs", model="integration.custom_workload:nan_when_evaluated",
        epochs=1, shards_per_epoch=2, parameter_servers=1, heartbeat_interval_s=0.2, heartbeat_timeout_s=5.0,
    )
    cluster = start_cluster(tmp_path, spec)
    try:
        _, results, status = run_agents(cluster, 1)
        client = CoordinatorClient(cluster.coordinator)
        try:
            late = WorkerAgent(client, threading.Event()).run()  # a worker (re)started afterwards
            final = client.status()
        finally:
            client.close()
    finally:
        stop_cluster(cluster)
    assert results == [EXIT_JOB_FAILED]
    assert status.state == cpb.JOB_STATE_FAILED
    [evaluator] = [m.member.member_id for m in status.members if m.role == common.ROLE_WORKER]
    assert status.failure == f"worker {evaluator}: the model diverged: evaluation loss is nan"
    assert not status.has_evaluation
    assert late == EXIT_JOB_FAILED
    assert final.state == cpb.JOB_STATE_FAILED and final.failure == status.failure
