"""Identity bound to credentials (issue 12, item 5): with auth on, a member token cannot register in
another role, nor register, heartbeat, deregister or push as another member; each attempt gets
PERMISSION_DENIED, changes nothing, and the job then succeeds. Real servers on 127.0.0.1:0."""

from __future__ import annotations

import subprocess
import sys
import threading

import grpc
import pytest

from lepton.clients import CoordinatorClient, ParameterClient
from lepton.control_wire import member_ref
from lepton.domain import Role
from lepton.ops.certs import make_dev_pki
from lepton.process import EXIT_CONFIG, ServiceOptions
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from worker.agent import WorkerAgent

from .conftest import start_cluster, stop_cluster
from .test_security_and_metrics import SPEC, security


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_dev_pki(tmp_path_factory.mktemp("pki"), ["localhost", "127.0.0.1"], parameter_servers=1, workers=2)


@pytest.fixture
def cluster(tmp_path, pki):
    c = start_cluster(
        tmp_path,
        SPEC,
        coordinator_options=ServiceOptions(security=security(pki, None, server=True)),
        ps_options=ServiceOptions(security=security(pki, "ps-0", server=True)),
    )
    try:
        yield c
    finally:
        stop_cluster(c)


def denied(call, *args) -> str:
    with pytest.raises(grpc.RpcError) as raised:
        call(*args, timeout=5)
    assert raised.value.code() is grpc.StatusCode.PERMISSION_DENIED, raised.value.details()
    return raised.value.details()


def snapshot(admin: CoordinatorClient):
    status = admin.status()
    layout = admin.layout()
    members = sorted((m.member.member_id, m.member.incarnation, m.alive) for m in status.members)
    return members, [(s.member_id, s.address) for s in layout.servers], layout.version


def test_identity_attacks_are_denied_change_nothing_and_the_job_succeeds(cluster, pki):
    admin = CoordinatorClient(cluster.coordinator, security=security(pki, "admin"))
    victim = CoordinatorClient(cluster.coordinator, security=security(pki, "worker-0"))
    thief = CoordinatorClient(cluster.coordinator, security=security(pki, "worker-1"))
    shared = CoordinatorClient(cluster.coordinator, security=security(pki, "worker"))  # bound to worker-*
    ps_thief = ParameterClient(cluster.servers[0], security=security(pki, "worker-1"))
    try:
        member, _ = victim.register(Role.WORKER, member_id="worker-0")
        before = snapshot(admin)
        ref = member_ref(member)
        ps_ref = common.MemberRef(member_id="ps-0", incarnation=1)

        # A worker token registering as parameter server ps-0 (which would repoint the layout).
        for client in (thief, shared):
            why = denied(client._stub.RegisterMember, cpb.RegisterMemberRequest(
                role=common.ROLE_PARAMETER_SERVER, member_id="ps-0", address="203.0.113.9:1"))
            assert "may register only as ROLE_WORKER" in why
        # Taking over, heartbeating as, and deregistering another worker.
        why = denied(
            thief._stub.RegisterMember, cpb.RegisterMemberRequest(role=common.ROLE_WORKER, member_id="worker-0")
        )
        assert "may act only as member 'worker-1', not 'worker-0'" in why
        denied(thief._stub.Heartbeat, cpb.HeartbeatRequest(member=ref))
        denied(thief._stub.Deregister, cpb.DeregisterRequest(member=ref))
        denied(thief._stub.LeaseShard, cpb.LeaseShardRequest(member=ref))
        # The shared worker token may not touch a server's identity either.
        denied(shared._stub.Heartbeat, cpb.HeartbeatRequest(member=ps_ref))
        denied(shared._stub.Deregister, cpb.DeregisterRequest(member=ps_ref))
        # Pushing to a parameter server in another worker's name.
        push = ppb.PushRequest(header=ppb.PushHeader(member=ref, base_version=0, sample_count=1))
        denied(ppb_grpc.ParameterServerStub(ps_thief._channel).Push, iter([push]))

        assert snapshot(admin) == before
        victim.deregister(member)  # the owner still may

        # The job then runs to success with the victim's own token under its own id.
        agent = WorkerAgent(
            victim, threading.Event(), member_id="worker-0",
            ps_client=lambda a: ParameterClient(a, security=security(pki, "worker-0")),
        )
        assert agent.run() == 0
        status = admin.status()
        assert status.state == cpb.JOB_STATE_SUCCEEDED and status.shard_completions == SPEC.shards_per_epoch
        assert status.members_declared_dead == 0
    finally:
        for c in (admin, victim, thief, shared, ps_thief):
            c.close()


@pytest.mark.parametrize("role", ["coordinator", "ps"])
def test_a_serving_role_refuses_plaintext_on_a_reachable_address_with_exit_2(role):
    argv = [sys.executable, "-m", "lepton", role, "--listen", "0.0.0.0:0"]
    if role == "ps":
        argv += ["--coordinator", "127.0.0.1:9"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)  # waits for, and reaps, the child
    assert done.returncode == EXIT_CONFIG
    assert "refusing to serve plaintext on 0.0.0.0:0" in done.stderr and "--insecure" in done.stderr
