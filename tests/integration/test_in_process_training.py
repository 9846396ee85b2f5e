"""Real servers on 127.0.0.1:0 in this process, with worker agents on threads."""

from __future__ import annotations

import threading

import pytest

from lepton.clients import CoordinatorClient, ParameterClient
from lepton.config import JobSpec
from lepton.v1 import coordinator_pb2 as cpb
from worker.agent import WorkerAgent

from .conftest import start_cluster, stop_cluster


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_two_workers_train_through_two_servers_in_process(tmp_path, mode):
    spec = JobSpec(
        mode=mode, epochs=3, shards_per_epoch=6, parameter_servers=2,
        heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0,
    )
    cluster = start_cluster(tmp_path, spec)
    stop = threading.Event()
    results: list[int] = []
    clients = [CoordinatorClient(cluster.coordinator) for _ in range(2)]
    agents = [WorkerAgent(c, stop) for c in clients]
    threads = [threading.Thread(target=lambda a=a: results.append(a.run()), daemon=True) for a in agents]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert not any(t.is_alive() for t in threads), "a worker did not finish"
        status = clients[0].status()
        servers = [ParameterClient(a) for a in cluster.servers]
        try:
            server_status = [s.server_status() for s in servers]
        except Exception:  # servers may already have left after the job ended
            server_status = []
        finally:
            for s in servers:
                s.close()
    finally:
        stop.set()
        for c in clients:
            c.close()
        stop_cluster(cluster)
    assert results == [0, 0]
    assert status.state == cpb.JOB_STATE_SUCCEEDED
    assert status.shard_completions == 3 * 6
    assert status.duplicate_completions_rejected == 0
    assert status.evaluation.accuracy > 0.85
    assert sum(a.shards_completed for a in agents) == 18
    for s in server_status:
        assert s.pushes_rejected == 0
