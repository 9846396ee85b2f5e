"""A user's own loss on a user's own regression data, through real servers in-process: the task
follows the labels' dtype, the targets meet the 1-output model without the user reshaping them, and
the coordinator receives regression metrics."""

from __future__ import annotations

import math

from lepton.config import JobSpec
from lepton.v1 import coordinator_pb2 as cpb

from .conftest import start_cluster, stop_cluster
from .test_in_process_training import run_agents


def test_a_custom_loss_trains_a_regression_task_chosen_by_float_labels(tmp_path):
    spec = JobSpec(
        dataset="integration.custom_workload:noisy_line",
        model="integration.custom_workload:regressor",
        loss="integration.custom_workload:huber",
        optimizer="adam", lr=0.05, epochs=4, batch_size=16, shards_per_epoch=4, parameter_servers=2,
        heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0,
    )  # fmt: skip
    cluster = start_cluster(tmp_path, spec)
    try:
        _, results, status = run_agents(cluster, 2)
    finally:
        stop_cluster(cluster)
    assert results == [0, 0]
    assert status.state == cpb.JOB_STATE_SUCCEEDED
    assert status.job.loss == "integration.custom_workload:huber"
    e = status.evaluation
    assert e.WhichOneof("task_metrics") == "regression"
    # the targets' variance is 1 + 4 + 0.25 + 9 = 14.25 and the noise's 0.01: an untrained model
    # scores R² <= 0, the least-squares line about 0.999
    assert e.regression.r2 > 0.95, e
    assert e.regression.mse < 0.5 and math.isfinite(e.loss) and e.loss > 0
