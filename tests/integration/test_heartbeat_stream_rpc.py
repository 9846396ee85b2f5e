"""HeartbeatStream and the control calls' retry of refusals, on a real coordinator servicer over real
gRPC: a stream answers each beat in order, ends with the beat's error (fenced, missing heartbeat),
is ended when idle, counts in the liveness class; a control call refused by the call limits is
retried until admitted."""

from __future__ import annotations

import random
import threading

import grpc
import pytest
import torch

from coordinator.job import Job
from coordinator.membership import Role
from coordinator.servicer import CoordinatorServicer, registration
from lepton.clients import CoordinatorClient
from lepton.clock import MonotonicClock
from lepton.config import JobSpec
from lepton.control_wire import member_from_ref
from lepton.domain import LeaseOutcome
from lepton.errors import Fenced
from lepton.limits import DEFAULT_LIMITS, Limits
from lepton.retry import RetryPolicy
from lepton.rpc import Server
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc
from support import wait_until


def serve(limits: Limits = DEFAULT_LIMITS):
    clock = MonotonicClock()
    job = Job(JobSpec(), 100, {"w": torch.zeros(2)})
    server = Server(
        "127.0.0.1:0", [registration(CoordinatorServicer(job, clock.now))], limits=limits, reflection_enabled=False,
    )
    server.start()
    return server, job, clock


@pytest.fixture
def coordinator():
    server, job, clock = serve()
    try:
        yield server, job, clock
    finally:
        server.stop(0.1)


def ref(member) -> common.MemberRef:
    return common.MemberRef(member_id=member.member_id, incarnation=member.incarnation)


def test_a_stream_answers_every_beat_in_order_and_renews_the_member(coordinator):
    server, job, clock = coordinator
    member = job.register(Role.WORKER, "", clock.now())
    with grpc.insecure_channel(server.address) as channel:
        beats = [cpb.HeartbeatStreamRequest(heartbeat=cpb.HeartbeatRequest(member=ref(member))) for _ in range(5)]
        replies = list(cpb_grpc.CoordinatorStub(channel).HeartbeatStream(iter(beats), timeout=10))
    assert len(replies) == 5
    assert all(r.heartbeat.job_state == cpb.JOB_STATE_WAITING_FOR_SERVERS for r in replies)
    assert all(r.heartbeat.heartbeat_interval_s == JobSpec().heartbeat_interval_s for r in replies)
    assert server.admission.in_flight()["liveness"] == 0  # the finished stream left its class


def test_a_beat_without_heartbeat_or_from_a_fenced_member_ends_the_stream_with_its_status(coordinator):
    server, job, clock = coordinator
    member = job.register(Role.WORKER, "", clock.now())
    with grpc.insecure_channel(server.address) as channel:
        stub = cpb_grpc.CoordinatorStub(channel)
        with pytest.raises(grpc.RpcError) as bad:
            list(stub.HeartbeatStream(iter([cpb.HeartbeatStreamRequest()]), timeout=10))
        assert bad.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "heartbeat is required" in bad.value.details()
        with pytest.raises(grpc.RpcError) as empty:
            list(stub.HeartbeatStream(iter([]), timeout=10))
        assert empty.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        job.deregister(member.member_id, member.incarnation, clock.now())
        with pytest.raises(grpc.RpcError) as fenced:
            list(stub.HeartbeatStream(
                iter([cpb.HeartbeatStreamRequest(heartbeat=cpb.HeartbeatRequest(member=ref(member)))]), timeout=10,
            ))
        assert fenced.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert fenced.value.details().startswith("fenced:")


def test_the_client_beats_on_one_stream_and_raises_fenced_when_the_member_is(coordinator):
    server, job, clock = coordinator
    client = CoordinatorClient(server.address)
    try:
        member, _ = client.register(Role.WORKER)
        for _ in range(3):
            assert client.beat(member).interval_s == JobSpec().heartbeat_interval_s
        assert client._beats.opened == 1
        wait_until(lambda: server.admission.in_flight()["liveness"] == 1, 10, "the open stream")
        job.deregister(member.member_id, member.incarnation, clock.now())
        with pytest.raises(Fenced):
            client.beat(member)
        wait_until(lambda: server.admission.in_flight()["liveness"] == 0, 10, "the failed stream to close")
    finally:
        client.close()


def test_a_silent_stream_is_ended_after_the_idle_time():
    server, job, clock = serve(DEFAULT_LIMITS.configured(idle_s=0.5))
    member = job.register(Role.WORKER, "", clock.now())
    release = threading.Event()

    def one_beat_then_silence():
        yield cpb.HeartbeatStreamRequest(heartbeat=cpb.HeartbeatRequest(member=ref(member)))
        release.wait(30)

    try:
        with grpc.insecure_channel(server.address) as channel:
            call = cpb_grpc.CoordinatorStub(channel).HeartbeatStream(one_beat_then_silence(), timeout=30)
            assert next(call).heartbeat.job_state == cpb.JOB_STATE_WAITING_FOR_SERVERS
            with pytest.raises(grpc.RpcError) as ended:
                next(call)
            assert ended.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            assert "no request message" in ended.value.details()
    finally:
        release.set()
        server.stop(0.1)


def test_a_control_call_refused_by_the_limits_is_retried_until_admitted():
    server, job, clock = serve(DEFAULT_LIMITS.configured(["control=1:1"]))
    member = job.register(Role.WORKER, "", clock.now())
    client = CoordinatorClient(server.address, retry=RetryPolicy(initial_backoff_s=0.05, max_backoff_s=0.2,
                                                                  max_attempts=200, max_total_s=30))
    client._rng = random.Random(0)
    holder_done = threading.Event()

    def hold_the_control_slot():
        with grpc.insecure_channel(server.address, options=[("lepton.test.connection", 1)]) as channel:
            # WAITING_FOR_SERVERS: a long poll of 1 s holds the one control call the class admits.
            cpb_grpc.CoordinatorStub(channel).LeaseShard(
                cpb.LeaseShardRequest(member=ref(member), max_wait_s=1.0), timeout=10,
            )
        holder_done.set()

    holder = threading.Thread(target=hold_the_control_slot, daemon=True)
    try:
        holder.start()
        wait_until(lambda: server.admission.in_flight()["control"] == 1, 10, "the long poll to hold the slot")
        grant = client.lease(member_from_ref(ref(member)))
        assert grant.outcome is LeaseOutcome.WAIT
        refused = sum(n for (method, _, _), n in server.admission.counts()[0].items() if method.endswith("LeaseShard"))
        assert refused >= 1  # the first attempts were refused, and retried
        assert holder_done.wait(10)
    finally:
        client.close()
        server.stop(0.1)
