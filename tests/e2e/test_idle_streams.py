"""A hand-started cluster (no supervisor) finishes its job while 200 idle WatchJob streams and 100
silent PushPull streams are held open against it, and nobody is declared dead."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections import Counter

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lepton.clients import CoordinatorClient
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from support import lepton_argv, read_json, wait_until

pytestmark = pytest.mark.e2e

WATCHES, WATCH_CONNECTIONS = 200, 25  # 8 a connection: each within its share of the watch class
PUSH_PULLS, PUSH_PULL_CONNECTIONS = 100, 4  # 25 a connection
EPOCHS, SHARDS, TIMEOUT_S = 4, 8, 3.0
SUCCEEDED = 5  # JOB_STATE_SUCCEEDED


def scrape(address: str) -> dict[tuple[str, tuple], float]:
    text = urllib.request.urlopen(f"http://{address}/metrics", timeout=5).read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels: str) -> float:
    """The sum of the samples of ``name`` whose labels include ``labels``."""
    return sum(v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls))


class Attack:
    """Holds ``count`` streams open over ``connections`` connections, opening a new one (at most
    once a second) for each that the server refused or ended, until stopped. Records how each
    ended."""

    def __init__(self, address: str, count: int, connections: int, open_stream) -> None:
        self.channels = [
            grpc.insecure_channel(address, options=[("lepton.test.connection", i)]) for i in range(connections)
        ]
        self._open = open_stream
        self._count = count
        self.ended: Counter[str] = Counter()
        self.opened = 0
        self._calls: list = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._hold, name="attack", daemon=True)

    def start(self) -> Attack:
        self._thread.start()
        return self

    def _hold(self) -> None:
        deadline = time.monotonic() + 240  # bounded whatever happens to the job
        while not self._stop.is_set() and time.monotonic() < deadline:
            still = []
            for call in self._calls:
                if call.done():
                    self.ended[call.code().name] += 1
                else:
                    still.append(call)
            while len(still) < self._count:
                still.append(self._open(self.channels[self.opened % len(self.channels)]))
                self.opened += 1
            self._calls = still
            self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)
        for call in self._calls:
            call.cancel()
        for channel in self.channels:
            channel.close()


def idle_watch(channel: grpc.Channel):
    return cpb_grpc.CoordinatorStub(channel).WatchJob(cpb.WatchJobRequest(), timeout=600)  # never read


def silent_push_pull(channel: grpc.Channel):
    release = threading.Event()

    def nothing():
        release.wait(600)
        return
        yield  # pragma: no cover

    call = ppb_grpc.ParameterServerStub(channel).PushPull(nothing(), timeout=600)
    call.add_done_callback(lambda _call: release.set())
    return call


def test_idle_watches_and_silent_push_pulls_neither_stop_heartbeats_nor_the_job(processes, tmp_path):
    coordinator = processes.start(
        "coordinator",
        lepton_argv(
            "coordinator", "--listen", "127.0.0.1:0", "--ready-file", str(tmp_path / "c.json"),
            "--parameter-servers", "2", "--epochs", str(EPOCHS), "--shards", str(SHARDS),
            "--heartbeat-timeout", str(TIMEOUT_S), "--metrics-port", "0", "--log-format", "json",
        ),
    )
    ready = wait_until(lambda: read_json(tmp_path / "c.json"), 60, "the coordinator")
    address, coordinator_metrics = ready["address"], ready["metrics"]
    servers = [
        processes.start(
            f"ps-{i}",
            lepton_argv(
                "ps", "--coordinator", address, "--listen", "127.0.0.1:0", "--metrics-port", "0",
                "--ready-file", str(tmp_path / f"ps-{i}.json"), "--log-format", "json",
            ),
        )
        for i in range(2)
    ]
    target = wait_until(lambda: read_json(tmp_path / "ps-0.json"), 60, "ps-0")
    wait_until(lambda: read_json(tmp_path / "ps-1.json"), 60, "ps-1")

    watches = Attack(address, WATCHES, WATCH_CONNECTIONS, idle_watch).start()
    pushes = Attack(target["address"], PUSH_PULLS, PUSH_PULL_CONNECTIONS, silent_push_pull).start()
    client = CoordinatorClient(address)
    try:
        # Every silent PushPull is held by the server, and the watch class is full, before anyone trains.
        wait_until(
            lambda: metric(scrape(target["metrics"]), "lepton_rpc_server_class_in_flight", rpc_class="data")
            == PUSH_PULLS, 30, "ps-0 holding the silent PushPull streams",
        )
        wait_until(
            lambda: metric(scrape(coordinator_metrics), "lepton_rpc_server_class_in_flight", rpc_class="watch")
            == 32, 30, "the coordinator's watch class full",
        )
        started = time.monotonic()
        workers = [processes.start(f"worker-{i}", lepton_argv("worker", "--coordinator", address)) for i in range(3)]
        members = servers + workers
        for proc in members:
            proc.wait(timeout=120)
        took_s = time.monotonic() - started
        final = client.status()
        coordinator_samples = scrape(coordinator_metrics)
    finally:
        watches.stop()
        pushes.stop()
        client.close()
    codes = [p.returncode for p in members]
    refused = metric(coordinator_samples, "lepton_rpc_server_rejected_total", method="WatchJob")
    heartbeats = metric(coordinator_samples, "lepton_rpc_server_handled_total", method="Heartbeat", code="OK")
    print(
        f"job {took_s:.1f}s under attack: state={final.state} completions={final.shard_completions} "
        f"dead={final.members_declared_dead} codes={codes} heartbeats_ok={heartbeats:g} "
        f"watches opened={watches.opened} ended={dict(watches.ended)} refused_by_coordinator={refused:g} "
        f"push_pulls opened={pushes.opened} ended={dict(pushes.ended)}"
    )
    assert final.state == SUCCEEDED
    assert final.members_declared_dead == 0
    assert final.shard_completions == EPOCHS * SHARDS
    assert codes == [0] * len(members)
    assert sorted(m.member.incarnation for m in final.members) == [1] * len(members)
    # The attack was real: the watch class was full (the rest refused at once) and the silent
    # streams were held until their idle time ended them.
    assert watches.ended["RESOURCE_EXHAUSTED"] >= WATCHES - 32
    assert refused >= WATCHES - 32
    assert set(pushes.ended) <= {"DEADLINE_EXCEEDED", "UNAVAILABLE", "CANCELLED"}

    coordinator.terminate()
    assert coordinator.wait(timeout=30) == 0
