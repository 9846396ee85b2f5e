"""The member's side of Coordinator.HeartbeatStream: one long-lived call carries every heartbeat.

``BeatStream.beat`` sends one HeartbeatStreamRequest and waits at most ``timeout_s`` for its
answer (a late answer cancels the stream). A stream that fails is dropped and the next beat opens
a new one; the failure is raised as the domain error (Fenced, NotFound, Unavailable, ...), as a
unary Heartbeat's would be. Against a coordinator that has no HeartbeatStream (UNIMPLEMENTED) and
while the coordinator refuses more streams (RESOURCE_EXHAUSTED) it beats with unary Heartbeat.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import grpc

from lepton.limits import Watchdog
from lepton.rpc import call, translate
from lepton.v1 import coordinator_pb2 as cpb

STREAM_LIFETIME_S = 3600.0  # the call's deadline: the stream is reopened after it, not kept forever
UNARY_BEATS_AFTER_REFUSAL = 20  # beats sent unary after RESOURCE_EXHAUSTED before a stream is tried again
_WATCHDOG = Watchdog(name="beat-deadlines")


class BeatStream:
    """Heartbeats over one stream, for one thread at a time (the member's heartbeat thread)."""

    def __init__(self, stub, timeout_s: float) -> None:  # type: ignore[no-untyped-def]
        self._stub = stub
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._requests: queue.SimpleQueue | None = None
        self._responses = None
        self.unimplemented = False  # the coordinator predates HeartbeatStream
        self._unary_left = 0
        self.opened = 0  # streams opened so far

    def beat(self, request: cpb.HeartbeatRequest) -> cpb.HeartbeatResponse:
        """Raises lepton.errors as a unary Heartbeat would."""
        with self._lock:
            if self.unimplemented or self._unary_left > 0:
                self._unary_left = max(0, self._unary_left - 1)
                return call(self._stub.Heartbeat, request, timeout=self._timeout_s)
            if self._responses is None:
                self._open()
            assert self._requests is not None and self._responses is not None
            responses = self._responses
            self._requests.put(cpb.HeartbeatStreamRequest(heartbeat=request))
            entry = _WATCHDOG.arm(self._timeout_s, responses.cancel)
            try:
                reply = next(responses)
            except StopIteration:
                self._close()
                raise translate(_Ended()) from None
            except grpc.RpcError as exc:
                self._close()
                code = exc.code() if hasattr(exc, "code") else None
                if code is grpc.StatusCode.UNIMPLEMENTED:
                    self.unimplemented = True
                    return call(self._stub.Heartbeat, request, timeout=self._timeout_s)
                if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
                    self._unary_left = UNARY_BEATS_AFTER_REFUSAL
                    return call(self._stub.Heartbeat, request, timeout=self._timeout_s)
                raise translate(exc) from None
            finally:
                Watchdog.disarm(entry)
            return reply.heartbeat

    def close(self) -> None:
        with self._lock:
            self._close()

    def _open(self) -> None:
        requests: queue.SimpleQueue = queue.SimpleQueue()

        def messages() -> Iterator[cpb.HeartbeatStreamRequest]:
            while True:
                item = requests.get()
                if item is None:
                    return
                yield item

        self._requests = requests
        self._responses = self._stub.HeartbeatStream(messages(), timeout=STREAM_LIFETIME_S)
        self.opened += 1

    def _close(self) -> None:
        if self._requests is not None:
            self._requests.put(None)  # ends the request stream: the server's handler returns
        if self._responses is not None:
            self._responses.cancel()
        self._requests = self._responses = None


class _Ended(grpc.RpcError):
    """A stream the server closed without a status error (it should not): retry."""

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "the coordinator ended the heartbeat stream; the next beat opens a new one"
