"""A server refuses RPCs beyond its concurrency limit with RESOURCE_EXHAUSTED and keeps serving."""

from __future__ import annotations

import grpc
import pytest
import torch

from coordinator.job import Job
from coordinator.membership import Role
from coordinator.servicer import CoordinatorServicer, registration
from lepton.clock import MonotonicClock
from lepton.config import JobSpec
from lepton.rpc import Server
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import coordinator_pb2_grpc as cpb_grpc
from support import wait_until


def test_rpcs_beyond_the_concurrency_limit_are_resource_exhausted():
    clock = MonotonicClock()
    job = Job(JobSpec(), 100, {"w": torch.zeros(2)})
    job.register(Role.WORKER, "", clock.now())  # one event for the watch to deliver
    server = Server("127.0.0.1:0", [registration(CoordinatorServicer(job, clock.now))], max_concurrent_rpcs=1)
    server.start()
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = cpb_grpc.CoordinatorStub(channel)
            watch = stub.WatchJob(cpb.WatchJobRequest(), timeout=30)  # occupies the only slot
            wait_until(lambda: next(watch, None) is not None, 10, "the watch to start")
            with pytest.raises(grpc.RpcError) as info:
                stub.GetStatus(cpb.GetStatusRequest(), timeout=5)
            assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            watch.cancel()

            def status_served():
                try:
                    return stub.GetStatus(cpb.GetStatusRequest(), timeout=5)
                except grpc.RpcError:
                    return None

            assert wait_until(status_served, 10, "the slot to be free again").job.epochs == 10
    finally:
        server.stop(0)
