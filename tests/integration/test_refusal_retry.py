"""A push refused by the server's call limits (RESOURCE_EXHAUSTED with a retry delay: nothing
ran) is sent again by ParameterClient, unchanged, after a jittered backoff, within the call's
deadline; a refusal that outlasts the deadline is raised, and nothing was applied for it. Real
server over real gRPC with the data class limited to one call; the one slot is held by a push
that waits on the gate's lock, which the test holds."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch

from lepton.clients import ParameterClient
from lepton.domain import MemberId
from lepton.errors import Refused, ResourceExhausted
from lepton.limits import DEFAULT_LIMITS
from lepton.rpc import RETRY_AFTER_KEY, Server, translate
from ps_server.parameter_server import ParameterServer
from ps_server.roster import WorkerEntry
from ps_server.servicer import ParameterServerServicer, registration
from support import wait_until

W0, W1 = MemberId("w-0", 1), MemberId("w-1", 1)
GRAD = {"dense": torch.ones(3, 4)}


@pytest.fixture
def tiny():
    """(node, server, two clients) with one data call at a time."""
    node = ParameterServer("ps-0")
    node.load({"dense": torch.zeros(3, 4)}, "sgd", 0.5, {}, "async", step_timeout_s=10)
    node.update_roster([WorkerEntry("w-0", 1, True), WorkerEntry("w-1", 1, True)])
    server = Server(
        "127.0.0.1:0", [registration(ParameterServerServicer(node))],
        limits=DEFAULT_LIMITS.configured(["data=1:1"]), reflection_enabled=False,
    )
    server.start()
    clients = [ParameterClient(server.address, timeout_s=20.0) for _ in range(2)]
    try:
        yield node, server, clients
    finally:
        for c in clients:
            c.close()
        server.stop(0)


class HeldGate:
    """Holds the gate's lock from another thread until released, so a push that reaches the gate
    waits there (holding its data slot)."""

    def __init__(self, node: ParameterServer) -> None:
        self.held, self.release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=lambda: node.gate.under_lock(self._hold))
        self._thread.start()
        assert self.held.wait(10)

    def _hold(self, store) -> None:
        self.held.set()
        assert self.release.wait(30)

    def open(self) -> None:
        self.release.set()
        self._thread.join(10)


@pytest.mark.parametrize("method", ["push_pull", "push_pull_async", "push"])
def test_a_refused_push_is_sent_again_until_admitted_and_applied_once(tiny, method):
    node, server, (first, second) = tiny
    gate = HeldGate(node)
    with ThreadPoolExecutor(2) as pool:
        try:
            holding = pool.submit(first.push_pull, W0, 0, 1, GRAD)
            wait_until(lambda: server.admission.in_flight()["data"] == 1, 10, "the first push to hold the slot")
            if method == "push_pull_async":
                retried = pool.submit(lambda: second.push_pull_async(W1, 0, 1, GRAD).result())
            else:
                retried = pool.submit(getattr(second, method), W1, 0, 1, GRAD)
            wait_until(lambda: second.refusals_retried >= 2, 10, "the second push to be refused and retried")
        finally:
            gate.open()
        assert holding.result(20)[0].applied
        reply = retried.result(20)
    assert (reply if method == "push" else reply[0]).applied
    assert node.gate.version == 2  # each push applied once
    rejected, _ = server.admission.counts()
    assert sum(n for (_, cls, _), n in rejected.items() if cls == "data") >= 2


def test_a_refusal_that_outlasts_the_deadline_is_raised_and_nothing_is_applied(tiny):
    node, server, (first, second) = tiny
    gate = HeldGate(node)
    with ThreadPoolExecutor(1) as pool:
        try:
            holding = pool.submit(first.push_pull, W0, 0, 1, GRAD)
            wait_until(lambda: server.admission.in_flight()["data"] == 1, 10, "the first push to hold the slot")
            with pytest.raises(Refused, match="limit of 1 concurrent data calls"):
                second.push_pull(W1, 0, 1, GRAD, timeout_s=0.5)
        finally:
            gate.open()
        assert holding.result(20)[0].applied
    assert node.gate.version == 1  # only the first push


class FakeRpcError(grpc.RpcError):
    def __init__(self, trailing) -> None:
        self._trailing = trailing

    def code(self):
        return grpc.StatusCode.RESOURCE_EXHAUSTED

    def details(self):
        return "too much"

    def trailing_metadata(self):
        return self._trailing


def test_only_a_refusal_with_a_retry_delay_is_retryable():
    refused = translate(FakeRpcError(((RETRY_AFTER_KEY, "50"),)))
    assert isinstance(refused, Refused) and refused.retry_after_s == 0.05
    too_large = translate(FakeRpcError(()))  # a message over the size limit: retrying cannot help
    assert isinstance(too_large, ResourceExhausted) and not isinstance(too_large, Refused)
