"""The ParameterServer gRPC service: decode chunks, one call on the ParameterServer, encode chunks
(the data-plane messages with the hand codec, ``lepton.data_wire``)."""

from __future__ import annotations

import grpc
import numpy as np
import torch

from lepton import codec, data_wire
from lepton.errors import Cancelled, InvalidArgument, LeptonError
from lepton.tensors import payload_bytes
from lepton.v1 import common_pb2 as common
from lepton.v1 import parameter_server_pb2 as pb
from lepton.v1 import parameter_server_pb2_grpc as pb_grpc
from lepton.wire import MODE_TO_WIRE
from ps_server.gate import PushOutcome, PushResult
from ps_server.parameter_server import ParameterServer, ServerStatus
from ps_server.shm_sessions import SessionInfo, SharedMemorySessions

DEFAULT_PUSH_TIMEOUT_S = 60.0
_OUTCOME = {PushOutcome.APPLIED: pb.PUSH_OUTCOME_APPLIED, PushOutcome.STALE: pb.PUSH_OUTCOME_STALE}


def _wait_budget_s(context) -> float:
    """How long a call may wait inside the server: its deadline less 50 ms for the answer to
    travel, or DEFAULT_PUSH_TIMEOUT_S without a deadline."""
    remaining = context.time_remaining()
    return DEFAULT_PUSH_TIMEOUT_S if remaining is None else max(0.0, remaining - 0.05)


def _member(ref: common.MemberRef) -> tuple[str, int]:
    if not ref.member_id or ref.incarnation < 1:
        raise InvalidArgument("member.member_id and member.incarnation >= 1 are required")
    return ref.member_id, ref.incarnation


def _selections(selections) -> dict[str, torch.Tensor]:
    """RowSelections by name (INVALID_ARGUMENT for a repeated or empty name)."""
    out: dict[str, torch.Tensor] = {}
    for s in selections:
        if not s.name or s.name in out:
            raise InvalidArgument(f"row selection with an empty or repeated name {s.name!r}")
        out[s.name] = torch.from_numpy(np.fromiter(s.rows, dtype=np.int64, count=len(s.rows)))
    return out


def _result(result: PushResult) -> pb.PushResponse:
    return pb.PushResponse(
        outcome=_OUTCOME[result.outcome], version=result.version, staleness=result.staleness
    )


def _identity(data: bytes) -> bytes:
    return data


class _Encoder:
    """Encodes the parameters a pull sends into PullResponse messages (``lepton.data_wire``),
    called by the gate under its lock on the live tensors: the encoding is the snapshot, the one
    copy of the data on the server's way out."""

    def __init__(self, chunk_bytes: int) -> None:
        self._chunk_bytes = chunk_bytes

    def __call__(self, version: int, tensors, result: PushResult | None = None) -> list[bytes]:
        push = _result(result) if result is not None else None
        return data_wire.encode_pull(version, tensors, self._chunk_bytes, push)


_STREAMED = _Encoder(codec.STREAM_CHUNK_BYTES)
_ONE_MESSAGE = _Encoder(1 << 62)


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """Adapter from the ParameterServer service to a ParameterServer."""

    def __init__(self, server: ParameterServer, shared: SharedMemorySessions | None = None) -> None:
        self._server = server
        self.shared = shared if shared is not None else SharedMemorySessions(server)

    def _decode_push(self, request_iterator, context, one_message: bool = False):
        """Reads the whole push stream: (member, base version, samples, gradients, timeout).
        ``one_message``: the push is a single message (PushPullUnary), which arrives whole or not
        at all, so fewer tensors than its header says is bad input, not a client that left."""
        try:
            first = next(request_iterator, None)
            if first is None or not first.HasField("header"):
                raise InvalidArgument("the first PushRequest must carry the header")
            header = first.header
            selected = _selections(header.rows)
            assembler = codec.TensorAssembler(self._server.push_layout(selected))
            for chunk in first.chunks:
                assembler.add(chunk)
            for msg in request_iterator:
                if msg.HasField("header"):
                    raise InvalidArgument("only the first PushRequest may carry a header")
                for chunk in msg.chunks:
                    assembler.add(chunk)
            begun, whole = assembler.received
            if whole < header.tensors and one_message:
                raise InvalidArgument(f"the push carries {whole} whole tensors, its header says {header.tensors}")
            if whole < header.tensors:  # grpc ends the stream of a client that left as if it had finished
                raise Cancelled(
                    f"the push stream ended after {whole} of its {header.tensors} tensors: its client left; "
                    "nothing was applied"
                )
            if header.tensors and begun > header.tensors:
                raise InvalidArgument(f"the push carries {begun} tensors, its header says {header.tensors}")
            grads = assembler.finish(require=list(selected))
            for name, rows in selected.items():
                grads[name] = codec.rows_to_sparse(self._server.specs[name], rows, grads[name])
        except LeptonError as exc:
            if context.is_active() and not isinstance(exc, Cancelled):  # a client that left sent nothing wrong
                self._server.note_rejected()
            raise
        timeout_s = _wait_budget_s(context)
        encoded = assembler.encoded_bytes
        wire = None if not encoded else (
            sum(payload_bytes(g) for n, g in grads.items() if n not in encoded) + sum(encoded.values())
        )
        return (
            *_member(header.member), header.base_version, header.sample_count, grads, timeout_s, header.request_id
        ), wire

    def Pull(self, request, context):
        _, messages = self._server.pull(
            *_member(request.member), list(request.names), _selections(request.rows), pack=_STREAMED
        )
        yield from messages

    def Push(self, request_iterator, context):
        push, wire = self._decode_push(request_iterator, context)
        return _result(self._server.push(*push, wire_bytes=wire))

    def PushPull(self, request_iterator, context):
        push, wire = self._decode_push(request_iterator, context)
        _, _, messages = self._server.push_pull(*push, pack=_STREAMED, wire_bytes=wire)
        yield from messages

    def PushPullUnary(self, request, context):
        push, wire = self._decode_push(iter((request,)), context, one_message=True)
        _, _, messages = self._server.push_pull(*push, pack=_ONE_MESSAGE, wire_bytes=wire)
        return messages[0]

    # --- shared memory (ps_server/shm_sessions.py) ------------------------------------------------

    def OpenSharedMemory(self, request, context):
        return _session_info(self.shared.open(*_member(request.member)))

    def PushPullShared(self, request, context):
        header = request.header
        if header.rows:
            raise InvalidArgument("shared memory carries dense tensors only: header.rows must be empty")
        timeout_s = _wait_budget_s(context)
        result, version = self.shared.push_pull(
            request.session_id, request.nonce, *_member(header.member), header.base_version, header.sample_count,
            list(request.tensors), header.tensors, timeout_s, header.request_id,
        )
        return pb.PushPullSharedResponse(push=_result(result), version=version)

    def CloseSharedMemory(self, request, context):
        self.shared.close_member(*_member(request.member), request.session_id)
        return pb.CloseSharedMemoryResponse()

    def JoinSteps(self, request, context):
        timeout_s = _wait_budget_s(context)
        joined, version = self._server.join_steps(*_member(request.member), request.from_version, timeout_s)
        return pb.JoinStepsResponse(joined=joined, version=version)

    def LeaveSteps(self, request, context):
        self._server.leave_steps(*_member(request.member))
        return pb.LeaveStepsResponse()

    def GetServerStatus(self, request, context):
        return encode_status(self._server.status())


def _session_info(info: SessionInfo) -> pb.OpenSharedMemoryResponse:
    return pb.OpenSharedMemoryResponse(
        session_id=info.session_id,
        gradients_segment=info.gradients_segment,
        parameters_segment=info.parameters_segment,
        segment_bytes=info.segment_bytes,
        tensors=[
            pb.SharedTensor(name=p.name, dtype=codec.wire_dtype(p.dtype), shape=p.shape, offset_bytes=p.offset_bytes)
            for p in info.tensors
        ],
    )


def encode_status(s: ServerStatus) -> pb.GetServerStatusResponse:
    """A server's status as the wire message (also written as the final status file)."""
    return pb.GetServerStatusResponse(
        member_id=s.member_id,
        version=s.version,
        updates_applied=s.updates_applied,
        pushes_received=s.pushes_received,
        pushes_stale=s.pushes_stale,
        pushes_rejected=s.pushes_rejected,
        steps_timed_out=s.steps_timed_out,
        max_clock_gap=s.max_clock_gap,
        max_compute_gap=s.max_compute_gap,
        max_staleness=s.max_staleness,
        mean_staleness=s.mean_staleness,
        bytes_pulled=s.bytes_pulled,
        bytes_pushed=s.bytes_pushed,
        mode=MODE_TO_WIRE.get(s.mode, common.CONSISTENCY_MODE_UNSPECIFIED),
    )


SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ParameterServer"].full_name


def add_to_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """Registers the service with the hand codec (``lepton.data_wire``) on the data-plane methods
    and the generated classes on the rest."""
    handlers = {
        "Pull": grpc.unary_stream_rpc_method_handler(
            servicer.Pull, pb.PullRequest.FromString, _identity
        ),
        "Push": grpc.stream_unary_rpc_method_handler(
            servicer.Push, data_wire.decode_push, pb.PushResponse.SerializeToString
        ),
        "PushPull": grpc.stream_stream_rpc_method_handler(servicer.PushPull, data_wire.decode_push, _identity),
        "PushPullUnary": grpc.unary_unary_rpc_method_handler(
            servicer.PushPullUnary, data_wire.decode_push, _identity
        ),
        **{
            name: grpc.unary_unary_rpc_method_handler(
                getattr(servicer, name), getattr(pb, f"{name}Request").FromString,
                getattr(pb, f"{name}Response").SerializeToString,
            )
            for name in ("OpenSharedMemory", "PushPullShared", "CloseSharedMemory")
        },
        "JoinSteps": grpc.unary_unary_rpc_method_handler(
            servicer.JoinSteps, pb.JoinStepsRequest.FromString, pb.JoinStepsResponse.SerializeToString
        ),
        "LeaveSteps": grpc.unary_unary_rpc_method_handler(
            servicer.LeaveSteps, pb.LeaveStepsRequest.FromString, pb.LeaveStepsResponse.SerializeToString
        ),
        "GetServerStatus": grpc.unary_unary_rpc_method_handler(
            servicer.GetServerStatus, pb.GetServerStatusRequest.FromString,
            pb.GetServerStatusResponse.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))


def registration(servicer: ParameterServerServicer):
    return (add_to_server, servicer, SERVICE_NAME)
