"""The server interceptor that applies the call limits (``lepton.limits``): it admits or refuses
each call with RESOURCE_EXHAUSTED, and ends request streams that go idle and response streams that
outlive their lifetime with DEADLINE_EXCEEDED."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import structlog

from lepton.handler_rewrap import rewrap
from lepton.limits import Admission, CallClass, Watchdog

log = structlog.get_logger("lepton.rpc")


REFUSAL_LOG_INTERVAL_S = 10.0
REFUSAL_RETRY_AFTER_S = 0.05  # the delay a refusal names; clients add jitter and back off from it
# Trailing metadata key of a retry delay in milliseconds (errors.NotReady, errors.Refused; options.proto).
RETRY_AFTER_KEY = "lepton-retry-after-ms"


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
            self._lifetime_entry = self._limiter.watchdog.arm(
                self._class.lifetime_s, lambda: self._end("lifetime", None)
            )

    def requests(self, request_iterator: Iterator[Any]) -> Iterator[Any]:
        """The request stream, each message awaited for at most the class's idle time."""
        idle_s = self._class.idle_s
        assert idle_s is not None  # wrapped only for classes with an idle time
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
        # Nothing ran: the client may send the same request again after this (errors.Refused).
        context.set_trailing_metadata(((RETRY_AFTER_KEY, str(round(REFUSAL_RETRY_AFTER_S * 1000))),))
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
