"""gRPC plumbing shared by every role: the one table between domain errors and status codes, the
server-side interceptor that applies it, server and channel construction, and the client-side
translation of status codes back into domain errors."""

from __future__ import annotations

import functools
import heapq
import itertools
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent import futures
from typing import Any, TypeVar

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from prometheus_client import CollectorRegistry

from lepton import errors
from lepton.handlers import rewrap
from lepton.limits import DEFAULT_LIMITS, Admission, CallClass, Limits, Watchdog
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
# Trailing metadata key of a retry delay in milliseconds (errors.NotReady; options.proto).
RETRY_AFTER_KEY = "lepton-retry-after-ms"
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
    passed: see ``lepton.metrics.left_because``); None while the call is live. Whatever a handler raises then is the consequence of the
    client leaving (its request stream raises, a wait is cut short), not a server fault."""
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


REFUSAL_LOG_INTERVAL_S = 10.0


def end_call(context: grpc.ServicerContext, code: grpc.StatusCode, details: str) -> None:
    """Ends a call from any thread with ``code`` and ``details`` (the client sees both); its
    handler's pending read or write returns, so its thread is freed. Falls back to a plain cancel
    (CANCELLED) if grpcio's call object is not where it was (checked against 1.85)."""
    try:
        context._rpc_event.call.cancel(code.value[0], details)  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001 - internals moved: the public cancel still frees the thread
        context.cancel()


class _StreamWatch:
    """The watchdog entries of one admitted call: the idle timer armed while its handler waits for
    the next request message, and the lifetime timer of a response stream."""

    def __init__(self, limiter: LimitInterceptor, method: str, c: CallClass, context: grpc.ServicerContext) -> None:
        self._limiter = limiter
        self._method = method
        self._class = c
        self._context = context
        self._lock = threading.Lock()
        self._idle_token: list | None = None
        self._lifetime_entry: list | None = None
        self.ended: str | None = None  # "idle" or "lifetime" once the watchdog ended the call

    def start_lifetime(self) -> None:
        if self._class.lifetime_s is not None:
            self._lifetime_entry = self._limiter.watchdog.arm(self._class.lifetime_s, lambda: self._end("lifetime", None))

    def requests(self, request_iterator: Iterator[Any]) -> Iterator[Any]:
        """The request stream, each message awaited for at most the class's idle time."""
        idle_s = self._class.idle_s
        while True:
            token: list = []  # stands for this wait: a timer firing as the message arrives ends nothing
            with self._lock:
                self._idle_token = token
                entry = self._limiter.watchdog.arm(idle_s, functools.partial(self._end, "idle", token))
            try:
                message = next(request_iterator)
            except StopIteration:
                return
            finally:
                with self._lock:
                    self._idle_token = None
                Watchdog.disarm(entry)
            yield message

    def _end(self, reason: str, token: list | None) -> None:
        with self._lock:
            if self.ended is not None or (token is not None and self._idle_token is not token):
                return  # the message arrived as the timer fired
            self.ended = reason
        c = self._class
        if reason == "idle":
            details = (
                f"no request message for {c.idle_s:g} s: the server ended the stream "
                f"(idle limit of {c.name} calls, --stream-idle-timeout)"
            )
        else:
            details = (
                f"the stream reached its lifetime of {c.lifetime_s:g} s and the server ended it "
                f"(--stream-lifetime); open it again (WatchJob: after the last sequence seen)"
            )
        self._limiter.admission.note_dropped(self._method, c, reason)
        end_call(self._context, grpc.StatusCode.DEADLINE_EXCEEDED, details)
        log.info("rpc_stream_ended", method=self._method, rpc_class=c.name, reason=reason, peer=self._context.peer())

    def close(self) -> None:
        with self._lock:
            self._idle_token = None
        if self._lifetime_entry is not None:
            Watchdog.disarm(self._lifetime_entry)
        if self.ended is not None:
            self._context.set_code(grpc.StatusCode.DEADLINE_EXCEEDED)  # counted as what the client saw


class LimitInterceptor(grpc.ServerInterceptor):
    """Admits each call into its class (``lepton.limits``) or refuses it at once with
    RESOURCE_EXHAUSTED naming the limit; ends request streams idle past their class's idle time and
    response streams older than its lifetime with DEADLINE_EXCEEDED, freeing their threads."""

    def __init__(self, admission: Admission, watchdog: Watchdog | None = None) -> None:
        self.admission = admission
        self.watchdog = watchdog or Watchdog()
        self._log_lock = threading.Lock()
        self._last_logged: dict[str, float] = {}

    def _refuse(self, method: str, c: CallClass, why: str, context: grpc.ServicerContext) -> None:
        now = time.monotonic()
        with self._log_lock:  # one line per class per interval: a flood must not flood the log
            due = now - self._last_logged.get(c.name, -REFUSAL_LOG_INTERVAL_S) >= REFUSAL_LOG_INTERVAL_S
            if due:
                self._last_logged[c.name] = now
        if due:
            log.warning("rpc_limit_reached", method=method, rpc_class=c.name, reason=why, peer=context.peer(),
                        in_flight=self.admission.in_flight()[c.name])
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, why)

    def _admitted(self, method: str, fn: Callable[..., Any], request_streaming: bool, response_streaming: bool):
        def begin(request: Any, context: grpc.ServicerContext) -> tuple[CallClass, str, _StreamWatch, Any]:
            peer = context.peer()
            c, why = self.admission.enter(method, peer)
            if why is not None:
                self._refuse(method, c, why, context)
            watch = _StreamWatch(self, method, c, context)
            if request_streaming and c.idle_s is not None:
                request = watch.requests(request)
            if response_streaming:
                watch.start_lifetime()
            return c, peer, watch, request

        def unary(request: Any, context: grpc.ServicerContext) -> Any:
            c, peer, watch, request = begin(request, context)
            try:
                return fn(request, context)
            finally:
                watch.close()
                self.admission.leave(c, peer)

        def stream(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            c, peer, watch, request = begin(request, context)
            try:
                yield from fn(request, context)
            finally:
                watch.close()
                self.admission.leave(c, peer)

        return stream if response_streaming else unary

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        m = handler_call_details.method
        streaming = handler.request_streaming
        return rewrap(
            handler,
            lambda fn: self._admitted(m, fn, streaming, False),
            lambda fn: self._admitted(m, fn, streaming, True),
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


class DeadlineGuard:
    """One thread that ends response streams still open ``GUARD_SLACK_S`` after their deadline.

    A defence in depth, not the deadline itself. The gRPC core ends a call at its deadline, but
    grpcio's response iterator (``_MultiThreadedRendezvous._next``) has been seen waiting forever
    on a call that already has its final status: a bidirectional PushPull to a parameter server
    that was cut off by a network partition, healed and shut down while the call was open (in
    about half of such runs here). The status had arrived, but the pending receive operation's
    completion never did, and the iterator waits for both (compare grpc/grpc#20562). Then
    ``cancel()`` does nothing (the call is over), so the guard removes that receive operation from
    the call's pending set and wakes the iterator, which raises the call's own status. That touches
    grpcio internals (checked against 1.85); if they change, the guard logs that it could not help.
    ``cancelled`` counts the streams it ended either way.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._heap: list[list] = []  # [due, sequence, call or None once finished]
        self._sequence = itertools.count()
        self._thread: threading.Thread | None = None
        self.cancelled = 0

    def watch(self, call: Any, timeout_s: float) -> list:
        entry = [time.monotonic() + timeout_s + GUARD_SLACK_S, next(self._sequence), call]
        with self._cond:
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="deadline-guard", daemon=True)
                self._thread.start()
            if self._heap[0] is entry:
                self._cond.notify()
        return entry

    @staticmethod
    def finished(entry: list) -> None:
        entry[2] = None  # dropped lazily when it reaches the top of the heap

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._heap and self._heap[0][2] is None:
                    heapq.heappop(self._heap)
                if not self._heap:
                    self._cond.wait()
                    continue
                delay = self._heap[0][0] - time.monotonic()
                if delay > 0:
                    self._cond.wait(delay)
                    continue
                call = heapq.heappop(self._heap)[2]
            if call is None:
                continue
            if call.cancel():
                how = "cancelled"
            elif _wake_finished_stream(call):
                how = "woken"
            else:
                log.error("stream_stuck_past_deadline", slack_s=GUARD_SLACK_S)
                continue
            self.cancelled += 1
            log.warning("stream_ended_past_deadline", how=how, slack_s=GUARD_SLACK_S)


def _wake_finished_stream(call: Any) -> bool:
    """Wakes a response iterator waiting for a receive completion on a call that has ended."""
    try:
        from grpc._cython import cygrpc

        state = call._state
        with state.condition:
            if state.code is None or cygrpc.OperationType.receive_message not in state.due:
                return False
            state.due.discard(cygrpc.OperationType.receive_message)
            state.condition.notify_all()
        return True
    except (AttributeError, ImportError):  # grpcio internals moved
        return False


GUARD_SLACK_S = 0.5
DEADLINE_GUARD = DeadlineGuard()


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
