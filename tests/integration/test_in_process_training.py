"""Real servers on 127.0.0.1:0 in this process, with worker agents on threads."""

from __future__ import annotations

import threading

import pytest

from lepton.clients import CoordinatorClient, ParameterClient
from lepton.config import JobSpec
from lepton.v1 import coordinator_pb2 as cpb
from worker.agent import WorkerAgent

from .conftest import start_cluster, stop_cluster


def run_agents(cluster, n: int, timeout_s: float = 120) -> tuple[list[WorkerAgent], list[int], cpb.GetStatusResponse]:
    """Runs ``n`` worker agents on threads until the job is over: (agents, exit codes, the
    coordinator's status at the end). Stops and closes everything whatever happens."""
    stop = threading.Event()
    results: list[int] = []
    clients = [CoordinatorClient(cluster.coordinator) for _ in range(n)]
    agents = [WorkerAgent(c, stop) for c in clients]
    threads = [threading.Thread(target=lambda a=a: results.append(a.run()), daemon=True) for a in agents]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=timeout_s)
        assert not any(t.is_alive() for t in threads), "a worker did not finish"
        return agents, results, clients[0].status()
    finally:
        stop.set()
        for t in threads:
            if t.ident is not None:  # started
                t.join(timeout=10)
        for c in clients:
            c.close()


@pytest.mark.parametrize("mode", ["async", "sync", "ssp"])
def test_two_workers_train_through_two_servers_in_process(tmp_path, mode):
    spec = JobSpec(
        mode=mode, staleness=1 if mode == "ssp" else 0, epochs=3, shards_per_epoch=6, parameter_servers=2,
        heartbeat_interval_s=0.2, heartbeat_timeout_s=2.0,
    )
    cluster = start_cluster(tmp_path, spec)
    try:
        agents, results, status = run_agents(cluster, 2)
        servers = [ParameterClient(a) for a in cluster.servers]
        try:
            server_status = [s.server_status() for s in servers]
        except Exception:  # servers may already have left after the job ended
            server_status = []
        finally:
            for s in servers:
                s.close()
    finally:
        stop_cluster(cluster)
    assert results == [0, 0]
    assert status.state == cpb.JOB_STATE_SUCCEEDED
    assert status.shard_completions == 3 * 6
    assert status.duplicate_completions_rejected == 0
    assert status.evaluation.accuracy > 0.85
    assert sum(a.shards_completed for a in agents) == 18
    for s in server_status:
        assert s.pushes_rejected == 0
        assert s.max_clock_gap <= spec.staleness + 1


def test_a_users_own_dataset_and_model_train_by_factory_string(tmp_path):
    spec = JobSpec(
        dataset="integration.custom_workload:blobs",
        model="integration.custom_workload:linear",
        optimizer="sgd",
        lr=0.1,
        optimizer_kwargs={"momentum": 0.9, "nesterov": True},
        lr_schedule="cosine",  # the servers build it from the spec they register with
        lr_schedule_kwargs={"t_max": 10_000},  # far beyond this job's updates: lr stays near 0.1
        epochs=2,
        shards_per_epoch=4,
        parameter_servers=1,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=2.0,
    )
    cluster = start_cluster(tmp_path, spec)
    stop = threading.Event()
    client = CoordinatorClient(cluster.coordinator)
    try:
        assert WorkerAgent(client, stop).run() == 0
        status = client.status()
    finally:
        stop.set()
        client.close()
        stop_cluster(cluster)
    assert status.state == cpb.JOB_STATE_SUCCEEDED
    assert status.job.optimizer.name == "sgd"
    assert dict(status.job.optimizer.kwargs) == {"momentum": 0.9, "nesterov": True}
    assert status.job.lr_schedule == "cosine" and dict(status.job.lr_schedule_kwargs) == {"t_max": 10_000}
    assert status.shard_completions == 8
    assert status.evaluation.samples == 100
    assert status.evaluation.accuracy > 0.95


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_a_sparse_embedding_model_trains_by_rows_through_two_servers(tmp_path, mode):
    """The table is cut across both servers; workers pull the rows each batch reads and push
    row gradients (Adam on the dense layer, SparseAdam on the table)."""
    spec = JobSpec(
        mode=mode,
        dataset="integration.custom_workload:token_bags",
        model="integration.custom_workload:bag_of_embeddings",
        optimizer="adam",
        lr=0.05,
        batch_size=25,
        epochs=3,
        shards_per_epoch=6,
        parameter_servers=2,
        heartbeat_interval_s=0.2,
        heartbeat_timeout_s=2.0,
    )
    cluster = start_cluster(tmp_path, spec)
    try:
        agents, results, status = run_agents(cluster, 2)
        client = CoordinatorClient(cluster.coordinator)
        try:
            layout = client.layout()
        finally:
            client.close()
    finally:
        stop_cluster(cluster)
    assert results == [0, 0]
    assert status.state == cpb.JOB_STATE_SUCCEEDED and status.shard_completions == 18
    assert status.evaluation.accuracy > 0.9
    table = [t for s in layout.servers for t in s.tensors if t.of == "embedding.weight"]
    assert len(table) == 2 and all(t.sparse and t.is_slice for t in table)
    steps = sum(a.steps for a in agents)
    table_bytes = 300 * 8 * 4
    # every push carried rows of the table, never all of it (25 docs x 8 tokens <= 200 of 300 rows)
    assert sum(a.bytes_pushed for a in agents) < steps * table_bytes
