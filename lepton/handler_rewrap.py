"""Rebuilding a gRPC method handler around new behaviour, for server interceptors.

grpcio hands an interceptor a ``RpcMethodHandler`` with one of four behaviours set; every
Lepton interceptor (error mapping, metrics, auth) wraps that behaviour and must rebuild a handler
of the same kind. This is the one place that knows the four kinds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

Behaviour = Callable[[Any, grpc.ServicerContext], Any]


def rewrap(
    handler: grpc.RpcMethodHandler,
    unary_response: Callable[[Behaviour], Behaviour],
    stream_response: Callable[[Behaviour], Behaviour],
    request_deserializer: Callable[[bytes], Any] | None = None,
) -> grpc.RpcMethodHandler:
    """A handler of the same kind whose behaviour is ``unary_response(old)`` for RPCs answering
    one message, or ``stream_response(old)`` for RPCs answering a stream (and, if given, another
    request deserializer)."""
    ser = (request_deserializer or handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(unary_response(handler.unary_unary), *ser)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(unary_response(handler.stream_unary), *ser)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(stream_response(handler.unary_stream), *ser)
    return grpc.stream_stream_rpc_method_handler(stream_response(handler.stream_stream), *ser)
