"""gRPC plumbing shared by every role: the one table between domain errors and status codes, the
server-side interceptor that applies it, server and channel construction, and the client-side
translation of status codes back into domain errors."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from lepton import errors
from lepton.deadline_guard import DEADLINE_GUARD
from lepton.handler_rewrap import rewrap
from lepton.limit_interceptor import RETRY_AFTER_KEY, LimitInterceptor
from lepton.limits import DEFAULT_LIMITS, Admission, Limits
from lepton.metrics import CLIENT_CALLS, LimitCollector, RpcMetricsInterceptor, left_because
from lepton.reflection import enable_reflection
from lepton.security import INSECURE, Security

log = structlog.get_logger("lepton.rpc")
T = TypeVar("T")

# The one table: most specific classes first (looked up along the exception's MRO).
STATUS_FOR_ERROR: dict[type[errors.LeptonError], grpc.StatusCode] = {
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ConfigError: grpc.StatusCode.INVALID_ARGUMENT,
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.StateNotSaved: grpc.StatusCode.UNAVAILABLE,  # retryable: nothing changed
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
    errors.DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.Cancelled: grpc.StatusCode.CANCELLED,  # or DEADLINE_EXCEEDED: see _abort
}
ERROR_FOR_STATUS: dict[grpc.StatusCode, type[errors.LeptonError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: errors.InvalidArgument,
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: errors.ResourceExhausted,
    grpc.StatusCode.UNAUTHENTICATED: errors.Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.UNAVAILABLE: errors.Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: errors.DeadlineExceeded,
}
# RETRY_AFTER_KEY: the trailing metadata key of a retry delay in milliseconds (errors.NotReady,
# errors.Refused; options.proto), defined beside the call limits, which send it too.
# Prefix of messages for fenced incarnations, so clients can tell Fenced from other preconditions.
FENCED_MARKER = "fenced:"

MiB = 1 << 20
DEFAULT_MAX_MESSAGE_MIB = 8
KEEPALIVE_TIME_MS = 20_000
KEEPALIVE_TIMEOUT_MS = 10_000


def status_for(exc: BaseException) -> grpc.StatusCode:
    """The status code for a domain error (INTERNAL for anything else)."""
    for cls in type(exc).__mro__:
        code = STATUS_FOR_ERROR.get(cls)  # type: ignore[arg-type]
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _details(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return FENCED_MARKER + " " + text if isinstance(exc, errors.Fenced) else text


def abandoned_status(context: grpc.ServicerContext) -> grpc.StatusCode | None:
    """CANCELLED or DEADLINE_EXCEEDED when the client has gone (it cancelled, or its deadline
    passed: see ``lepton.metrics.left_because``); None while the call is live. Whatever a handler
    raises then is the consequence of the client leaving (its request stream raises, a wait is cut
    short), not a server fault."""
    if context.is_active():
        return None
    return left_because(context.time_remaining())


def _abandoned(context: grpc.ServicerContext, method: str, exc: BaseException) -> bool:
    """Records a call the client gave up on (counted under its own code, logged at info without a
    traceback); False if the client is still there."""
    code = abandoned_status(context)
    if code is None:
        return False
    log.info("rpc_abandoned", method=method, code=code.name, reason=str(exc) or type(exc).__name__)
    context.set_code(code)
    return True


def _abort(context: grpc.ServicerContext, method: str, exc: BaseException) -> None:
    if _abandoned(context, method, exc):
        return
    if isinstance(exc, errors.Cancelled):  # the client left before grpc told the call so
        code = left_because(context.time_remaining())
        log.info("rpc_abandoned", method=method, code=code.name, reason=str(exc))
        context.abort(code, str(exc))
    code = status_for(exc)
    if code is grpc.StatusCode.INTERNAL:
        log.exception("rpc_failed", method=method)
    else:
        log.info("rpc_rejected", method=method, code=code.name, reason=str(exc))
    retry_after_s = getattr(exc, "retry_after_s", None)
    if retry_after_s is not None:
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(max(0, round(retry_after_s * 1000)))),))
    context.abort(code, _details(exc))


class Undecodable:
    """Stands for request bytes that are not a valid message: the handler answers
    INVALID_ARGUMENT instead of grpc's own INTERNAL 'Exception deserializing request!'."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is the client's fault
            return Undecodable(f"{type(exc).__name__}: {exc}")

    return decode


def _checked(request: Any) -> Any:
    """The request, or for a request stream an iterator that stops at undecodable messages."""
    if isinstance(request, Undecodable):
        raise errors.InvalidArgument(f"the request is not a valid message ({request.reason})")
    if hasattr(request, "__next__"):
        return (_checked(item) for item in request)
    return request


def guard_unary(method: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return fn(_checked(request), context)
        except errors.LeptonError as exc:
            _abort(context, method, exc)
        except Exception as exc:  # a request must never kill the server
            if context.code() is not None:  # already aborted by grpc itself
                raise
            _abort(context, method, exc)
        return None

    return wrapped


def guard_stream(method: str, fn: Callable[..., Iterator[Any]]) -> Callable[..., Iterator[Any]]:
    def wrapped(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        try:
            yield from fn(_checked(request), context)
        except errors.LeptonError as exc:
            _abort(context, method, exc)
        except GeneratorExit:  # grpc closes the response stream of a client that left
            code = abandoned_status(context)
            if code is not None:
                log.info("rpc_abandoned", method=method, code=code.name, reason="the response stream was closed")
            raise
        except Exception as exc:
            if context.code() is not None:
                raise
            _abort(context, method, exc)

    return wrapped


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns domain errors raised by any handler into their status code with the error's message;
    anything unexpected becomes INTERNAL and is logged. Servicers therefore never call abort."""

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        return rewrap(
            handler,
            lambda fn: guard_unary(method, fn),
            lambda fn: guard_stream(method, fn),
            tolerant(handler.request_deserializer),
        )


def message_options(max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB) -> list[tuple[str, int]]:
    """Explicit message-size limits (the 4 MiB default is never relied upon)."""
    return [
        ("grpc.max_send_message_length", max_message_mib * MiB),
        ("grpc.max_receive_message_length", max_message_mib * MiB),
    ]


def server_options(max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB) -> list[tuple[str, int]]:
    return message_options(max_message_mib) + [
        # Accept the clients' keepalive pings (see channel_options), and no more often.
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", KEEPALIVE_TIME_MS // 2),
        ("grpc.so_reuseport", 0),
    ]


def channel_options(max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB) -> list[tuple[str, int]]:
    return message_options(max_message_mib) + [
        ("grpc.keepalive_time_ms", KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
        # Reconnect quickly after a peer restarts.
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 2000),
    ]


class Server:
    """A bound gRPC server with health checking and reflection. Construction binds the port and
    nothing else; ``start`` serves; ``stop`` flips health to NOT_SERVING, then drains."""

    def __init__(
        self,
        address: str,
        registrations: Iterable[tuple[Callable[[Any, grpc.Server], None], Any, str]],
        *,
        max_workers: int | None = None,
        max_concurrent_rpcs: int | None = None,
        max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB,
        security: Security = INSECURE,
        registry: CollectorRegistry | None = None,
        reflection_enabled: bool = True,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        # Every call is admitted into its class (lepton.limits) or refused at once. The pool has a
        # thread for every call the classes admit together, plus spares for calls being refused, and
        # grpc admits no more calls than it has threads: no call ever waits for a thread, so idle
        # calls of one class cannot starve another class.
        threads = max_workers or limits.threads()
        self.admission = Admission(limits)
        # Outermost first: metrics see the final status, limits apply before auth and any handler.
        interceptors: list[grpc.ServerInterceptor] = []
        if registry is not None:
            interceptors.append(RpcMetricsInterceptor(registry))
            registry.register(LimitCollector(self.admission))
        interceptors.append(LimitInterceptor(self.admission))
        interceptors += security.server_interceptors()
        interceptors.append(ErrorMappingInterceptor())
        self._server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="rpc"),
            interceptors=interceptors,
            options=server_options(max_message_mib),
            # Beyond this many RPCs in flight, new ones get RESOURCE_EXHAUSTED instead of queueing.
            maximum_concurrent_rpcs=max_concurrent_rpcs or threads,
        )
        self.health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        names = [health.SERVICE_NAME]
        self._service_names: list[str] = []
        for add, servicer, full_name in registrations:
            add(servicer, self._server)
            self._service_names.append(full_name)
        names += self._service_names
        if reflection_enabled:
            enable_reflection(names, self._server)  # grpc.reflection.v1 and v1alpha
        credentials = security.server_credentials()
        self.tls = credentials is not None
        self.port = (
            self._server.add_secure_port(address, credentials)
            if credentials is not None
            else self._server.add_insecure_port(address)
        )
        if self.port == 0:
            raise errors.ConfigError(f"cannot listen on {address}")
        host = address.rsplit(":", 1)[0]
        self.address = f"{host}:{self.port}"

    def start(self) -> None:
        self._server.start()
        for name in ["", *self._service_names]:
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def stop(self, grace_s: float = 2.0) -> None:
        self.health.enter_graceful_shutdown()
        self._server.stop(grace_s).wait(grace_s + 1)

    def wait(self, timeout_s: float | None = None) -> bool:
        return self._server.wait_for_termination(timeout_s)


def dial(
    address: str, security: Security = INSECURE, max_message_mib: int = DEFAULT_MAX_MESSAGE_MIB
) -> grpc.Channel:
    """One channel to ``address`` with Lepton's options (TLS and bearer token as ``security``
    says); reuse it for every call."""
    credentials = security.channel_credentials()
    options = channel_options(max_message_mib)
    channel = (
        grpc.secure_channel(address, credentials, options=options)
        if credentials is not None
        else grpc.insecure_channel(address, options=options)
    )
    interceptors = security.client_interceptors()
    return grpc.intercept_channel(channel, *interceptors) if interceptors else channel


def translate(exc: grpc.RpcError) -> errors.LeptonError:
    """The domain error for a failed call."""
    code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
    details = (exc.details() if hasattr(exc, "details") else "") or ""
    if code is grpc.StatusCode.FAILED_PRECONDITION and details.startswith(FENCED_MARKER):
        return errors.Fenced(details[len(FENCED_MARKER) :].strip())
    cls = ERROR_FOR_STATUS.get(code, errors.LeptonError)
    if code is grpc.StatusCode.CANCELLED:
        cls = errors.Unavailable
    if code is grpc.StatusCode.UNAVAILABLE:
        retry_after_s = retry_after(exc)
        if retry_after_s is not None:
            return errors.NotReady(details, retry_after_s)
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        retry_after_s = retry_after(exc)
        if retry_after_s is not None:  # refused by the call limits, not a size limit
            return errors.Refused(details, retry_after_s)
    return cls(f"{code.name}: {details}" if cls is errors.LeptonError else details)


def retry_after(exc: grpc.RpcError) -> float | None:
    """The retry delay in seconds a failed call's trailing metadata names (None: none or malformed)."""
    try:
        trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    except Exception:  # noqa: BLE001 - a call object without trailers
        return None
    for key, value in trailing or ():
        if key == RETRY_AFTER_KEY:
            try:
                ms = int(value)
            except (TypeError, ValueError):
                return None
            return ms / 1000 if ms >= 0 else None
    return None


def call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Invokes a stub method, raising the domain error instead of grpc.RpcError. Counts calls
    without a deadline and calls that outlived theirs (``lepton.metrics.CLIENT_CALLS``)."""
    start = time.monotonic()
    try:
        return fn(*args, **kwargs)
    except grpc.RpcError as exc:
        raise translate(exc) from None
    finally:
        CLIENT_CALLS.record(kwargs.get("timeout"), time.monotonic() - start)


def iterate(responses: Iterator[T], timeout_s: float | None = None) -> Iterator[T]:
    """Iterates a response stream, raising domain errors instead of grpc.RpcError. With
    ``timeout_s`` (the call's deadline) the stream is also watched by ``DEADLINE_GUARD``."""
    entry = DEADLINE_GUARD.watch(responses, timeout_s) if timeout_s is not None else None
    try:
        yield from responses
    except grpc.RpcError as exc:
        raise translate(exc) from None
    finally:
        if entry is not None:
            DEADLINE_GUARD.finished(entry)
