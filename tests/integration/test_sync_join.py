"""A sync worker joins the steps with JoinSteps on every server (see the proto) and waits there
for a server that is behind; it must still notice a stop (SIGTERM) within about a second."""

from __future__ import annotations

import threading
import time

import torch

from lepton.clients import CoordinatorClient, ParameterClient
from lepton.config import JobSpec
from lepton.domain import Role
from lepton.errors import NotFound, Unavailable
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from support import job_events, wait_until
from worker.agent import WorkerAgent
from worker.sync_steps import JOIN_POLL_S

from .conftest import start_cluster, stop_cluster


def test_a_sync_worker_waiting_in_join_steps_leaves_promptly_when_stopped(tmp_path):
    # A heartbeat timeout of 60 s: the worker's whole join wait would be 2 x 60 + 10 s, and nothing
    # is declared dead (nor any step timed out) during the test.
    spec = JobSpec(
        mode="sync", epochs=2, shards_per_epoch=2, parameter_servers=2,
        heartbeat_interval_s=0.2, heartbeat_timeout_s=60.0,
    )
    cluster = start_cluster(tmp_path, spec)
    stop = threading.Event()
    coord = CoordinatorClient(cluster.coordinator)
    agent_client = CoordinatorClient(cluster.coordinator)
    servers = [ParameterClient(a) for a in cluster.servers]
    results: list[int] = []
    thread: threading.Thread | None = None
    try:
        # Another client, by hand, joins step 0 on both servers and then pushes to one only, as a
        # worker that died between its pushes to different servers leaves things: that server is
        # at version 1; the other stays at 0, its step 0 waiting for a push that never comes (until
        # the member is declared dead, a minute away).
        puppet, _ = coord.register(Role.WORKER)
        layout = wait_until(lambda: coord.layout() if len(coord.layout().servers) == 2 else None, 60, "the layout")

        def joined(client):
            try:
                return client.join_steps(puppet, 0, timeout_s=5.0) == (True, 0)
            except (NotFound, Unavailable):  # no assignment yet (NotReady), or the member is new to it
                return False

        for client in servers:
            wait_until(lambda client=client: joined(client), 30, "the hand-made participant to join")
        ahead = next(s for s in layout.servers if s.tensors)
        zeros = {t.name: torch.zeros(t.shape, dtype=t.dtype) for t in ahead.tensors}
        assert servers[cluster.servers.index(ahead.address)].push_pull(puppet, 0, 1, zeros)[0].applied
        assert sorted(s.server_status().version for s in servers) == [0, 1]

        agent = WorkerAgent(agent_client, stop)
        thread = threading.Thread(target=lambda: results.append(agent.run()), daemon=True)
        thread.start()
        # The worker joins from step 1: accepted at once where the version is 1, waited for where it is 0.
        wait_until(lambda: agent.join_polls >= 2, 30, "the worker to wait in JoinSteps")
        assert agent.steps == 0
        member = next(m for m in coord.status().members if m.role == common.ROLE_WORKER and m.has_lease)

        stopped = time.monotonic()
        stop.set()
        thread.join(timeout=5 * JOIN_POLL_S)
        assert not thread.is_alive(), "the worker stayed in JoinSteps after its stop"
        print(f"stop to exit: {(time.monotonic() - stopped) * 1000:.0f} ms")
        assert results == [0]
        status = coord.status()
        gone = next(m for m in status.members if m.member.member_id == member.member.member_id)
        assert not gone.alive and not gone.has_lease  # it deregistered: the shard went back
        assert status.members_declared_dead == 0
        assert any(
            e.kind == cpb.EVENT_KIND_SHARD_REQUEUED and e.member.member_id == member.member.member_id
            for e in job_events(coord)
        )
    finally:
        stop.set()
        if thread is not None:
            thread.join(timeout=30)
        for s in servers:
            s.close()
        coord.close()
        agent_client.close()
        stop_cluster(cluster)

