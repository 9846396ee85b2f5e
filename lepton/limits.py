"""Per-class and per-peer limits on concurrent calls, and the watchdog that ends idle streams.

Every method belongs to one class (``METHOD_CLASSES``). A class admits at most ``limit`` calls
at once, and at most ``per_peer`` of them from one peer (one client connection, as gRPC names it:
``ipv4:10.0.0.7:51234``); a call beyond either is refused at once, never queued. Request streams
of a class with ``idle_s`` are ended when the next message takes longer than that, and response
streams of a class with ``lifetime_s`` are ended that long after they began. ``lepton.rpc``
applies these to every call and sizes the server's thread pool so that an admitted call always
finds a thread. Nothing here imports grpc.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace

import structlog

from lepton.errors import ConfigError
from lepton.timers import Timer, TimerHeap

log = structlog.get_logger("lepton.limits")

HEARTBEAT, CONTROL, READ, WATCH, DATA, STEPS = "heartbeat", "control", "read", "watch", "data", "steps"
LIVENESS = "liveness"


@dataclass(frozen=True)
class CallClass:
    """A class of calls: ``limit`` at once, ``per_peer`` of them from one peer; ``idle_s``: the
    longest wait for a request stream's next message; ``lifetime_s``: the longest life of a
    response stream (None: unbounded)."""

    name: str
    limit: int
    per_peer: int
    idle_s: float | None = None
    lifetime_s: float | None = None

    def __post_init__(self) -> None:
        if self.limit < 1 or not 1 <= self.per_peer <= self.limit:
            raise ConfigError(
                f"rpc class {self.name}: need limit >= 1 and 1 <= per-peer share <= limit, "
                f"got {self.limit}:{self.per_peer}"
            )
        for what, value in (("idle time", self.idle_s), ("lifetime", self.lifetime_s)):
            if value is not None and not value > 0:
                raise ConfigError(f"rpc class {self.name}: the stream {what} must be > 0 seconds, got {value}")


_C, _P = "/lepton.v1.Coordinator/", "/lepton.v1.ParameterServer/"
HEARTBEAT_STREAM = _C + "HeartbeatStream"
# The one method-to-class table; a method not named here is READ.
METHOD_CLASSES: dict[str, str] = {
    _C + "Heartbeat": HEARTBEAT,
    HEARTBEAT_STREAM: LIVENESS,
    **{
        _C + m: CONTROL
        for m in (
            "RegisterMember", "Deregister", "GetAssignment", "ReportReady", "GetLayout", "LeaseShard",
            "ReportProgress", "CompleteShard", "ReportEvaluation", "DeclineEvaluation", "CancelJob",
            "ReportFailure", "RequestCheckpoint",
        )
    },
    _C + "GetStatus": READ,
    _C + "GetCheckpoint": READ,
    _C + "WatchJob": WATCH,
    _P + "Pull": DATA,
    _P + "Push": DATA,
    _P + "PushPull": DATA,
    _P + "PushPullUnary": DATA,
    _P + "PushPullShared": DATA,
    _P + "OpenSharedMemory": STEPS,
    _P + "CloseSharedMemory": STEPS,
    _P + "JoinSteps": STEPS,
    _P + "LeaveSteps": STEPS,
    _P + "GetServerStatus": READ,
    "/grpc.health.v1.Health/Check": READ,
    "/grpc.health.v1.Health/Watch": WATCH,
}
DEFAULT_IDLE_S = 10.0
DEFAULT_LIFETIME_S = 300.0
DEFAULT_CLASSES = (
    CallClass(HEARTBEAT, limit=64, per_peer=16),
    CallClass(CONTROL, limit=64, per_peer=32),
    CallClass(READ, limit=32, per_peer=16, idle_s=DEFAULT_IDLE_S),  # reflection is a request stream
    CallClass(WATCH, limit=32, per_peer=8, lifetime_s=DEFAULT_LIFETIME_S),
    CallClass(DATA, limit=128, per_peer=32, idle_s=DEFAULT_IDLE_S),
    CallClass(STEPS, limit=64, per_peer=32),
    # One long-lived HeartbeatStream per member: a thousand members hold a thousand calls (and, on
    # the synchronous server, threads), each idle between beats.
    CallClass(LIVENESS, limit=2048, per_peer=1024, idle_s=DEFAULT_IDLE_S),
)
SPARE_THREADS = 16  # beyond the sum of the limits: calls being refused, requests still arriving


@dataclass(frozen=True)
class Limits:
    """The classes a server enforces and the method-to-class table."""

    classes: tuple[CallClass, ...] = DEFAULT_CLASSES
    methods: Mapping[str, str] = field(default_factory=lambda: dict(METHOD_CLASSES))
    default_class: str = READ

    def __post_init__(self) -> None:
        names = [c.name for c in self.classes]
        unknown = sorted({*self.methods.values(), self.default_class} - set(names))
        if unknown or len(set(names)) != len(names):
            raise ConfigError(f"rpc classes {names} must be distinct and include {unknown}")

    def of(self, method: str) -> CallClass:
        name = self.methods.get(method, self.default_class)
        return next(c for c in self.classes if c.name == name)

    def threads(self) -> int:
        """A thread pool this large always has a thread for an admitted call: no class can hold
        more than its limit, so a call of another class never waits behind it. The liveness class
        is left out: only the coordinator serves it, and adds a thread per stream it admits."""
        return sum(c.limit for c in self.classes if c.name != LIVENESS) + SPARE_THREADS

    def configured(
        self, overrides: Iterable[str] = (), idle_s: float | None = None, lifetime_s: float | None = None
    ) -> Limits:
        """These limits with ``CLASS=LIMIT[:PER_PEER]`` overrides (``--rpc-limit``), a new idle
        time for every class that has one (``--stream-idle-timeout``), and a new lifetime for
        every class that has one (``--stream-lifetime``). ConfigError names a bad value."""
        by_name = {c.name: c for c in self.classes}
        for text in overrides:
            name, _, value = text.partition("=")
            if name not in by_name or not value:
                raise ConfigError(
                    f"--rpc-limit {text!r}: expected CLASS=LIMIT[:PER_PEER] with CLASS one of {', '.join(by_name)}"
                )
            limit_text, _, peer_text = value.partition(":")
            try:
                limit = int(limit_text)
                per_peer = int(peer_text) if peer_text else min(by_name[name].per_peer, limit)
            except ValueError:
                raise ConfigError(f"--rpc-limit {text!r}: LIMIT and PER_PEER must be whole numbers") from None
            by_name[name] = replace(by_name[name], limit=limit, per_peer=per_peer)
        for name, c in by_name.items():
            if idle_s is not None and c.idle_s is not None:
                by_name[name] = c = replace(c, idle_s=idle_s)
            if lifetime_s is not None and c.lifetime_s is not None:
                by_name[name] = replace(c, lifetime_s=lifetime_s)
        return replace(self, classes=tuple(by_name.values()))


DEFAULT_LIMITS = Limits()


class Admission:
    """Counts the calls in flight per class and per (class, peer); ``enter`` admits one or says
    why not; ``leave`` ends an admitted one. Also counts refusals and ended streams for metrics."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._in_flight: dict[str, int] = {c.name: 0 for c in limits.classes}
        self._by_peer: dict[tuple[str, str], int] = {}
        # (method, class, reason) -> count; reason: class_limit | peer_share | idle | lifetime
        self.rejected: dict[tuple[str, str, str], int] = {}
        self.dropped: dict[tuple[str, str, str], int] = {}

    def enter(self, method: str, peer: str) -> tuple[CallClass, str | None]:
        """(the method's class, None) if the call is admitted, else (class, why not)."""
        c = self.limits.of(method)
        key = (c.name, peer)
        with self._lock:
            if self._in_flight[c.name] >= c.limit:
                reason, why = "class_limit", (
                    f"the server is at its limit of {c.limit} concurrent {c.name} calls "
                    f"(--rpc-limit {c.name}={c.limit}:{c.per_peer}); retry later"
                )
            elif self._by_peer.get(key, 0) >= c.per_peer:
                reason, why = "peer_share", (
                    f"this connection already has {c.per_peer} concurrent {c.name} calls, its share "
                    f"(--rpc-limit {c.name}={c.limit}:{c.per_peer}); retry later"
                )
            else:
                self._in_flight[c.name] += 1
                self._by_peer[key] = self._by_peer.get(key, 0) + 1
                return c, None
            counted = (method, c.name, reason)
            self.rejected[counted] = self.rejected.get(counted, 0) + 1
        return c, why

    def leave(self, c: CallClass, peer: str) -> None:
        key = (c.name, peer)
        with self._lock:
            self._in_flight[c.name] -= 1
            left = self._by_peer[key] - 1
            if left:
                self._by_peer[key] = left
            else:
                del self._by_peer[key]

    def note_dropped(self, method: str, c: CallClass, reason: str) -> None:
        with self._lock:
            key = (method, c.name, reason)
            self.dropped[key] = self.dropped.get(key, 0) + 1

    def counts(self) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str, str], int]]:
        """Copies of (rejected, dropped)."""
        with self._lock:
            return dict(self.rejected), dict(self.dropped)

    def in_flight(self) -> dict[str, int]:
        with self._lock:
            return dict(self._in_flight)

    def peers(self, name: str) -> int:
        """Peers with a call of class ``name`` in flight."""
        with self._lock:
            return sum(1 for (c, _), n in self._by_peer.items() if c == name and n)


class Watchdog(TimerHeap):
    """One thread that calls each armed callback once its delay has passed, unless disarmed first
    (``lepton.timers.TimerHeap`` under the names the call limits use)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, name: str = "rpc-watchdog") -> None:
        super().__init__(name, clock)

    def arm(self, delay_s: float, callback: Callable[[], None]) -> Timer:
        return self.schedule(delay_s, callback)

    disarm = TimerHeap.cancel
    armed = TimerHeap.pending
