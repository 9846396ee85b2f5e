"""The worker's end of the shared-memory data path (OpenSharedMemory / PushPullShared, see
protos/lepton/v1/parameter_server.proto), used by ``lepton.clients.ParameterClient``.

A ``SharedMemoryLink`` opens a session with its server on the first push-pull of a member, maps
the two segments and proves co-location with their nonces; a step writes the gradients into one
segment, makes one small unary call and reads the parameters from the other. Whenever shared
memory cannot carry a step, ``start`` returns None and the caller uses gRPC: for good (one log
line) when the server lacks the method, refuses sessions or does not share this /dev/shm; for this
step only when the session ended or the push does not fit it (a sparse or unknown tensor).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import grpc
import structlog
import torch

from lepton import codec, shm
from lepton.control_wire import member_ref
from lepton.domain import MemberId
from lepton.rpc import translate
from lepton.v1 import parameter_server_pb2 as ppb

log = structlog.get_logger("lepton.shm")
_SERVICE = "/" + ppb.DESCRIPTOR.services_by_name["ParameterServer"].full_name + "/"
# Codes after which the server may still be reading the segments: the session is dropped.
_IN_DOUBT = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL)
Answer = tuple[int, dict[str, torch.Tensor], ppb.PushResponse]


class _Session:
    def __init__(self, member: MemberId, info: ppb.OpenSharedMemoryResponse, directory: Path) -> None:
        self.member = member
        self.session_id = info.session_id
        self.placements = [
            shm.Placement(t.name, codec.torch_dtype(t.dtype), tuple(t.shape), t.offset_bytes) for t in info.tensors
        ]
        self.index = {p.name: i for i, p in enumerate(self.placements)}
        self.grads = shm.Segment.attach(info.gradients_segment, info.segment_bytes, directory)
        try:
            self.params = shm.Segment.attach(info.parameters_segment, info.segment_bytes, directory)
        except shm.SegmentError:
            self.grads.close()
            raise
        self.nonce = self.grads.nonce + self.params.nonce
        self.grad_views = self.grads.views(self.placements)
        self.param_views = self.params.views(self.placements)

    def close(self) -> None:
        self.grad_views = self.param_views = []
        self.grads.close()
        self.params.close()


class SharedMemoryLink:
    """Shared memory with one parameter server, over the client's channel.

    ``start`` writes a step's gradients and starts its call (or returns None: use gRPC); the
    returned callable gives (version, parameters, PushResponse) or raises lepton.errors. The
    parameter tensors are views of the segment, valid until the next step: copy them out.
    """

    def __init__(self, channel: grpc.Channel, address: str, timeout_s: float, directory: Path = shm.SHM_DIR) -> None:
        self._address = address
        self._timeout_s = timeout_s
        self._directory = directory
        self._open = channel.unary_unary(
            _SERVICE + "OpenSharedMemory", request_serializer=ppb.OpenSharedMemoryRequest.SerializeToString,
            response_deserializer=ppb.OpenSharedMemoryResponse.FromString,
        )
        self._step = channel.unary_unary(
            _SERVICE + "PushPullShared", request_serializer=ppb.PushPullSharedRequest.SerializeToString,
            response_deserializer=ppb.PushPullSharedResponse.FromString,
        )
        self._close = channel.unary_unary(
            _SERVICE + "CloseSharedMemory", request_serializer=ppb.CloseSharedMemoryRequest.SerializeToString,
            response_deserializer=ppb.CloseSharedMemoryResponse.FromString,
        )
        self._session: _Session | None = None
        self.off_reason = ""  # set once shared memory will not be tried again
        self.steps = 0  # steps carried over shared memory

    @property
    def active(self) -> bool:
        return self._session is not None

    def _give_up(self, reason: str) -> None:
        self.off_reason = reason
        log.info("shm_unavailable_using_grpc", server=self._address, reason=reason)
        self.drop()

    def _ensure(self, member: MemberId) -> _Session | None:
        session = self._session
        if session is not None and session.member == member:
            return session
        self.drop()
        try:
            info = self._open(ppb.OpenSharedMemoryRequest(member=member_ref(member)), timeout=self._timeout_s)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            if code in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.FAILED_PRECONDITION,
                        grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.PERMISSION_DENIED):
                self._give_up(f"{code.name}: {exc.details() if hasattr(exc, 'details') else exc}")
            return None  # not ready, unknown member yet: the gRPC path reports it; try again later
        try:
            session = _Session(member, info, self._directory)
        except (shm.SegmentError, ValueError) as exc:
            self._close_remote(member, info.session_id)
            self._give_up(f"cannot map the server's segments here: {exc}")
            return None
        self._session = session
        log.info("shm_session_opened", server=self._address, session=info.session_id)
        return session

    def start(
        self,
        member: MemberId,
        header: ppb.PushHeader,
        grads: Mapping[str, torch.Tensor],
        timeout_s: float,
    ) -> Callable[[], Answer | None] | None:
        """Writes the gradients into the segment and starts the call; None: use gRPC for this
        step. The callable returns the answer, or None when the step must go over gRPC after all
        (the session ended or the nonce was refused: nothing was applied), or raises."""
        if self.off_reason or header.rows:
            return None
        session = self._ensure(member)
        if session is None:
            return None
        indices = []
        for name, g in grads.items():
            i = session.index.get(name)
            if i is None or g.is_sparse:
                return None  # the gRPC path reports what is wrong with it precisely
            p = session.placements[i]
            if g.dtype != p.dtype or tuple(g.shape) != p.shape:
                return None
            indices.append(i)
        with torch.no_grad():
            for i, g in zip(indices, grads.values(), strict=True):
                session.grad_views[i].copy_(g)
        request = ppb.PushPullSharedRequest(
            header=header, session_id=session.session_id, nonce=session.nonce, tensors=indices
        )
        future = self._step.future(request, timeout=timeout_s)
        return lambda: self._finish(session, future)

    def _finish(self, session: _Session, future) -> Answer | None:
        try:
            answer = future.result()
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else None
            details = (exc.details() if hasattr(exc, "details") else "") or ""
            if details.startswith("shared memory:"):
                if code is grpc.StatusCode.FAILED_PRECONDITION and "nonce" in details:
                    self._give_up(details)
                else:
                    self.drop(tell_server=False)
                return None
            if code in _IN_DOUBT:
                self.drop()
            raise translate(exc) from None
        self.steps += 1
        tensors = {p.name: v for p, v in zip(session.placements, session.param_views, strict=True)}
        return answer.version, tensors, answer.push

    def _close_remote(self, member: MemberId, session_id: str) -> None:
        try:
            self._close(
                ppb.CloseSharedMemoryRequest(member=member_ref(member), session_id=session_id),
                timeout=min(self._timeout_s, 5.0),
            )
        except grpc.RpcError:
            pass  # the server ends it with the member, or at exit

    def drop(self, tell_server: bool = True) -> None:
        """Ends the session here (and on the server, best effort); the next step opens another."""
        session, self._session = self._session, None
        if session is not None:
            session.close()
            if tell_server:
                self._close_remote(session.member, session.session_id)
