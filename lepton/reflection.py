"""gRPC server reflection under both names clients ask for: grpc.reflection.v1 (grpcurl, Postman
and current grpc tools try it first) and grpc.reflection.v1alpha (older clients).

grpcio-reflection (checked against 1.85) serves v1alpha only. The v1 service has the very same
messages, field for field, under another package, so one v1alpha servicer answers both: the v1
method decodes and encodes with the v1alpha message classes (identical bytes on the wire), and a
copy of the v1alpha file renamed to grpc/reflection/v1/reflection.proto goes into the descriptor
pool so that reflection can describe the v1 service itself.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_reflection.v1alpha import reflection, reflection_pb2

V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"
V1ALPHA_SERVICE_NAME = reflection.SERVICE_NAME
_V1_FILE = "grpc/reflection/v1/reflection.proto"


def _add_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindFileByName(_V1_FILE)
        return
    except KeyError:
        pass
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    old, new = proto.package, "grpc.reflection.v1"
    proto.name, proto.package = _V1_FILE, new
    proto.options.Clear()  # language options name the v1alpha packages
    for message in proto.message_type:
        for f in message.field:
            if f.type_name.startswith(f".{old}."):
                f.type_name = f".{new}." + f.type_name[len(old) + 2 :]
    for service in proto.service:
        for method in service.method:
            method.input_type = f".{new}." + method.input_type[len(old) + 2 :]
            method.output_type = f".{new}." + method.output_type[len(old) + 2 :]
    pool.Add(proto)


def enable_reflection(service_names: Iterable[str], server: grpc.Server) -> None:
    """Serves reflection v1 and v1alpha on ``server`` for ``service_names`` (and themselves)."""
    names = [*service_names, V1_SERVICE_NAME, V1ALPHA_SERVICE_NAME]
    pool = descriptor_pool.Default()
    _add_v1_descriptor(pool)
    servicer = reflection.ReflectionServicer(names, pool=pool)
    reflection.enable_server_reflection(names, server, pool=pool)  # v1alpha, with its own servicer
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )
