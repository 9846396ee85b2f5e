"""Per-class and per-peer call limits and idle-stream endings on real servers over real gRPC: a
class at its limit refuses with RESOURCE_EXHAUSTED while other classes are served; silent request
streams and unread watches are ended and their threads freed."""

from __future__ import annotations

import threading

import grpc
import pytest
import torch
from prometheus_client import CollectorRegistry

from coordinator.job import Job
from coordinator.membership import Role
from coordinator.servicer import CoordinatorServicer
from coordinator.servicer import registration as coordinator_registration
from lepton.clock import MonotonicClock
from lepton.config import JobSpec
from lepton.limits import DEFAULT_LIMITS, Limits
from lepton.rpc import Server
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc
from lepton.v1 import parameter_server_pb2 as ppb
from lepton.v1 import parameter_server_pb2_grpc as ppb_grpc
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry
from ps_server.servicer import ParameterServerServicer
from ps_server.servicer import registration as ps_registration
from support import wait_until

WORKER = common.MemberRef(member_id="w-0", incarnation=1)


def connection(address: str, index: int) -> grpc.Channel:
    """A channel on its own connection (grpcio shares one between channels with equal arguments)."""
    return grpc.insecure_channel(address, options=[("lepton.test.connection", index)])


@pytest.fixture
def open_channels():
    made: list[grpc.Channel] = []

    def make(address: str, index: int) -> grpc.Channel:
        made.append(connection(address, index))
        return made[-1]

    yield make
    for channel in made:
        channel.close()


class Silence:
    """A request stream that sends ``first`` (if any) and then nothing until released."""

    def __init__(self, first=None) -> None:
        self.release = threading.Event()
        self._first = first

    def __iter__(self):
        if self._first is not None:
            yield self._first
        self.release.wait(60)


def outcome(call) -> grpc.StatusCode:
    try:
        for _ in call:
            pass
    except grpc.RpcError as exc:
        return exc
    return None


def coordinator_server(limits: Limits, registry=None):
    clock = MonotonicClock()
    job = Job(JobSpec(), 100, {"w": torch.zeros(2)})
    member = job.register(Role.WORKER, "", clock.now())
    server = Server(
        "127.0.0.1:0", [coordinator_registration(CoordinatorServicer(job, clock.now))], limits=limits,
        registry=registry, reflection_enabled=False,
    )
    server.start()
    return server, member


def ps_server(limits: Limits, registry=None):
    node = ParameterServer("ps-0")
    node.load({"dense": torch.ones(3, 4)}, "sgd", 0.1, {}, "async", step_timeout_s=10)
    node.update_roster([WorkerEntry("w-0", 1, True)])
    server = Server(
        "127.0.0.1:0", [ps_registration(ParameterServerServicer(node))], limits=limits, registry=registry,
        reflection_enabled=False,
    )
    server.start()
    return server


def heartbeat(stub, member) -> cpb.HeartbeatResponse:
    ref = common.MemberRef(member_id=member.member_id, incarnation=member.incarnation)
    return stub.Heartbeat(cpb.HeartbeatRequest(member=ref), timeout=5)


def test_a_class_at_its_limit_refuses_at_once_while_other_classes_are_served(open_channels):
    registry = CollectorRegistry()
    server, member = coordinator_server(DEFAULT_LIMITS.configured(["watch=2:2"]), registry)
    try:
        stubs = [cpb_grpc.CoordinatorStub(open_channels(server.address, i)) for i in range(2)]
        watches = [stubs[0].WatchJob(cpb.WatchJobRequest(), timeout=30) for _ in range(2)]
        for watch in watches:
            assert next(watch).sequence >= 1  # admitted and serving
        with pytest.raises(grpc.RpcError) as refused:
            next(stubs[1].WatchJob(cpb.WatchJobRequest(), timeout=30))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "limit of 2 concurrent watch calls" in refused.value.details()
        assert "--rpc-limit watch=2:2" in refused.value.details()

        # Heartbeats, control and read calls have their own capacity.
        assert heartbeat(stubs[1], member).job_state > 0
        ref = common.MemberRef(member_id=member.member_id, incarnation=member.incarnation)
        assert stubs[1].LeaseShard(cpb.LeaseShardRequest(member=ref), timeout=5).outcome == cpb.LEASE_OUTCOME_WAIT
        assert stubs[1].GetStatus(cpb.GetStatusRequest(), timeout=5).job.epochs == 10

        watches[0].cancel()
        wait_until(lambda: server.admission.in_flight()["watch"] == 1, 10, "the cancelled watch to leave")
        assert next(stubs[1].WatchJob(cpb.WatchJobRequest(), timeout=30)).sequence >= 1
        watches[1].cancel()
        labels = {
            "service": "lepton.v1.Coordinator",
            "method": "WatchJob",
            "rpc_class": "watch",
            "reason": "class_limit",
        }
        assert registry.get_sample_value("lepton_rpc_server_rejected_total", labels) == 1
        handled = {"service": "lepton.v1.Coordinator", "method": "WatchJob", "code": "RESOURCE_EXHAUSTED"}
        assert registry.get_sample_value("lepton_rpc_server_handled_total", handled) == 1
        assert registry.get_sample_value("lepton_rpc_server_class_limit", {"rpc_class": "watch"}) == 2
    finally:
        server.stop(0)


def test_one_connection_gets_only_its_share_of_a_class(open_channels):
    server, _ = coordinator_server(DEFAULT_LIMITS.configured(["watch=4:2"]))
    try:
        greedy, other = (cpb_grpc.CoordinatorStub(open_channels(server.address, i)) for i in range(2))
        held = [greedy.WatchJob(cpb.WatchJobRequest(), timeout=30) for _ in range(2)]
        for watch in held:
            next(watch)
        with pytest.raises(grpc.RpcError) as refused:
            next(greedy.WatchJob(cpb.WatchJobRequest(), timeout=30))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "this connection already has 2 concurrent watch calls" in refused.value.details()
        served = other.WatchJob(cpb.WatchJobRequest(), timeout=30)
        assert next(served).sequence >= 1  # another connection still has room in the class
        for watch in [*held, served]:
            watch.cancel()
        assert server.admission.counts()[0] == {("/lepton.v1.Coordinator/WatchJob", "watch", "peer_share"): 1}
    finally:
        server.stop(0)


def test_silent_push_pull_streams_are_ended_after_the_idle_time_and_free_their_slots(open_channels):
    registry = CollectorRegistry()
    server = ps_server(DEFAULT_LIMITS.configured(["data=2:2"], idle_s=0.5), registry)
    try:
        stub = ppb_grpc.ParameterServerStub(open_channels(server.address, 0))
        silences = [Silence() for _ in range(2)]
        calls = [stub.PushPull(iter(s), timeout=30) for s in silences]
        wait_until(lambda: server.admission.in_flight()["data"] == 2, 10, "both silent streams admitted")
        with pytest.raises(grpc.RpcError) as refused:  # the class is full of silent streams
            next(stub.Pull(ppb.PullRequest(member=WORKER), timeout=5))
        assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert stub.GetServerStatus(ppb.GetServerStatusRequest(), timeout=5).member_id == "ps-0"

        ended = [outcome(call) for call in calls]
        assert [e.code() for e in ended] == [grpc.StatusCode.DEADLINE_EXCEEDED] * 2
        assert all("no request message for 0.5 s" in e.details() for e in ended)
        wait_until(lambda: server.admission.in_flight()["data"] == 0, 10, "the silent streams' slots to free")
        assert next(stub.Pull(ppb.PullRequest(member=WORKER), timeout=5)).version == 0
        labels = {"service": "lepton.v1.ParameterServer", "method": "PushPull", "rpc_class": "data", "reason": "idle"}
        assert registry.get_sample_value("lepton_rpc_server_streams_ended_total", labels) == 2
        handled = {"service": "lepton.v1.ParameterServer", "method": "PushPull", "code": "DEADLINE_EXCEEDED"}
        assert registry.get_sample_value("lepton_rpc_server_handled_total", handled) == 2
        for s in silences:
            s.release.set()
    finally:
        server.stop(0)


def test_a_push_that_stops_after_its_header_is_ended_and_changes_nothing(open_channels):
    server = ps_server(DEFAULT_LIMITS.configured(idle_s=0.5))
    try:
        stub = ppb_grpc.ParameterServerStub(open_channels(server.address, 0))
        header = ppb.PushHeader(member=WORKER, base_version=0, sample_count=1, request_id="r-1", tensors=1)
        silence = Silence(first=ppb.PushRequest(header=header))
        with pytest.raises(grpc.RpcError) as ended:
            stub.Push(iter(silence), timeout=30)
        silence.release.set()
        assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "no request message for 0.5 s" in ended.value.details()
        status = stub.GetServerStatus(ppb.GetServerStatusRequest(), timeout=5)
        assert (status.version, status.updates_applied) == (0, 0)
    finally:
        server.stop(0)


def test_a_watch_whose_client_never_reads_is_ended_at_its_lifetime(open_channels):
    server, _ = coordinator_server(DEFAULT_LIMITS.configured(lifetime_s=1.0))
    try:
        stub = cpb_grpc.CoordinatorStub(open_channels(server.address, 0))
        unread = stub.WatchJob(cpb.WatchJobRequest(), timeout=60)  # never read until the end
        wait_until(lambda: server.admission.in_flight()["watch"] == 1, 10, "the watch admitted")
        wait_until(lambda: server.admission.in_flight()["watch"] == 0, 10, "the watch ended by its lifetime")
        assert server.admission.counts()[1] == {("/lepton.v1.Coordinator/WatchJob", "watch", "lifetime"): 1}
        error = outcome(unread)
        assert error.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert "lifetime of 1 s" in error.details()
    finally:
        server.stop(0)


def test_more_idle_streams_than_the_old_thread_pool_leave_both_servers_answering(open_channels):
    """The issue's reproduction: 70 idle streams used to take all 64 threads of a server."""
    coordinator, member = coordinator_server(DEFAULT_LIMITS)
    ps = ps_server(DEFAULT_LIMITS)
    silences = [Silence() for _ in range(70)]
    try:
        watch_stubs = [cpb_grpc.CoordinatorStub(open_channels(coordinator.address, i)) for i in range(10)]
        watches = [watch_stubs[i % 10].WatchJob(cpb.WatchJobRequest(), timeout=60) for i in range(70)]
        data_stubs = [ppb_grpc.ParameterServerStub(open_channels(ps.address, 100 + i)) for i in range(3)]
        pushes = [data_stubs[i % 3].PushPull(iter(s), timeout=60) for i, s in enumerate(silences)]
        wait_until(lambda: ps.admission.in_flight()["data"] == 70, 20, "70 silent PushPull streams admitted")
        wait_until(
            lambda: (
                coordinator.admission.in_flight()["watch"] == DEFAULT_LIMITS.of("/lepton.v1.Coordinator/WatchJob").limit
            ),
            20,
            "the watch class full",
        )
        stub = cpb_grpc.CoordinatorStub(open_channels(coordinator.address, 99))
        for _ in range(5):
            assert heartbeat(stub, member).job_state > 0
        assert ppb_grpc.ParameterServerStub(open_channels(ps.address, 199)).GetServerStatus(
            ppb.GetServerStatusRequest(), timeout=5
        ).member_id == "ps-0"
        assert next(data_stubs[0].Pull(ppb.PullRequest(member=WORKER), timeout=5)).version == 0
        for call in [*watches, *pushes]:
            call.cancel()
    finally:
        for s in silences:
            s.release.set()
        coordinator.stop(0)
        ps.stop(0)
