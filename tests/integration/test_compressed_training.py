"""Whole jobs with gradient compression: a coordinator and two parameter servers on 127.0.0.1:0
in this process and two real worker agents, training digits with fp16 and with top-k pushes.
They converge (accuracy above a sane floor, not a tight bound: bench/compression.py measures how
close to uncompressed they come) and push fewer bytes than the raw gradients."""

from __future__ import annotations

import threading

import pytest

from lepton.clients import CoordinatorClient
from lepton.config import JobSpec
from lepton.v1 import coordinator_pb2 as cpb
from worker.agent import WorkerAgent

from .conftest import start_cluster, stop_cluster


def run_workers(cluster, n: int, timeout_s: float = 120) -> tuple[list[WorkerAgent], list[int], cpb.GetStatusResponse]:
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
            if t.ident is not None:
                t.join(timeout=10)
        for c in clients:
            c.close()


@pytest.mark.parametrize("compression, ratio", [("fp16", 0.01), ("topk", 0.05)])
def test_a_compressed_digits_job_trains_and_pushes_fewer_bytes(tmp_path, compression, ratio):
    spec = JobSpec(
        mode="async", epochs=4, shards_per_epoch=6, parameter_servers=2, heartbeat_interval_s=0.2,
        heartbeat_timeout_s=2.0, device="cpu", gradient_compression=compression, topk_ratio=ratio,
    )
    cluster = start_cluster(tmp_path, spec)
    try:
        agents, results, status = run_workers(cluster, 2)
    finally:
        stop_cluster(cluster)
    assert results == [0, 0]
    assert status.state == cpb.JOB_STATE_SUCCEEDED
    assert status.job.gradient_compression != 0 and status.job.topk_ratio == ratio
    assert status.evaluation.accuracy > 0.8, status.evaluation.accuracy
    trainer = agents[0]._trainer
    assert trainer is not None
    raw_per_push = sum(t.numel() * t.element_size() for t in trainer.tensors.values())
    pushes = sum(a.pushes for a in agents)
    per_push = sum(a.bytes_pushed for a in agents) / pushes
    most = 0.5 if compression == "fp16" else 0.15  # 2 of 4 bytes; 5 % of the elements at 8 bytes each, + raw biases
    assert per_push <= most * raw_per_push, (per_push, raw_per_push)
