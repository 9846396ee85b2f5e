from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from coordinator.main import serve as serve_coordinator
from lepton.config import JobSpec
from lepton.process import ServiceOptions
from ps_server.main import serve as serve_ps
from support import read_json, wait_until


@dataclass
class InProcessCluster:
    spec: JobSpec
    coordinator: str
    servers: list[str]
    stops: list[threading.Event]
    threads: list[threading.Thread]
    metrics: list[str | None]  # coordinator first, then each server


def start_cluster(
    tmp: Path,
    spec: JobSpec,
    coordinator_options: ServiceOptions = ServiceOptions(),
    ps_options: ServiceOptions = ServiceOptions(),
) -> InProcessCluster:
    """A coordinator and spec.parameter_servers servers on 127.0.0.1:0, each serving on a thread
    with its own stop event (a server stops itself when the job is over, as a process would)."""
    stops = [threading.Event() for _ in range(spec.parameter_servers + 1)]
    threads = [
        threading.Thread(
            target=serve_coordinator,
            args=(spec, "127.0.0.1:0", stops[0]),
            kwargs={"ready_file": str(tmp / "c.json"), "grace_s": 0.5, "options": coordinator_options},
            daemon=True,
        )
    ]
    threads[0].start()
    facts = wait_until(lambda: read_json(tmp / "c.json"), 60, "the coordinator")
    address = facts["address"]
    metrics = [facts.get("metrics")]
    for i in range(spec.parameter_servers):
        t = threading.Thread(
            target=serve_ps,
            args=(address, "127.0.0.1:0", stops[i + 1]),
            kwargs={"ready_file": str(tmp / f"ps{i}.json"), "grace_s": 0.5, "options": ps_options},
            daemon=True,
        )
        t.start()
        threads.append(t)
    ps_facts = [
        wait_until(lambda i=i: read_json(tmp / f"ps{i}.json"), 60, f"ps {i}") for i in range(spec.parameter_servers)
    ]
    servers = [f["address"] for f in ps_facts]
    metrics += [f.get("metrics") for f in ps_facts]
    return InProcessCluster(spec, address, servers, stops, threads, metrics)


def stop_cluster(cluster: InProcessCluster) -> None:
    """Servers first, then the coordinator: a server still loading its assignment finishes that
    call against a live coordinator and then sees its stop, as in `lepton up`'s stop order."""
    for stop in cluster.stops[1:]:
        stop.set()
    for t in cluster.threads[1:]:
        t.join(timeout=10)
    cluster.stops[0].set()
    cluster.threads[0].join(timeout=10)
    assert not any(t.is_alive() for t in cluster.threads), "a server thread did not stop"


@pytest.fixture(scope="module")
def idle_cluster(tmp_path_factory) -> Iterator[InProcessCluster]:
    """A training job with one parameter server and no workers, for poking at with raw requests."""
    spec = JobSpec(
        epochs=1, shards_per_epoch=4, parameter_servers=1, heartbeat_interval_s=0.2, heartbeat_timeout_s=600.0
    )
    cluster = start_cluster(tmp_path_factory.mktemp("idle"), spec)
    try:
        yield cluster
    finally:
        stop_cluster(cluster)
