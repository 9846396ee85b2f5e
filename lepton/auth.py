"""Authorisation on the server side: bearer tokens with roles, checked by one server interceptor
against one method-to-role table, member-id binding, and the audit log.

A server's token table is a TOML file (``--auth-file`` or ``LEPTON_AUTH_FILE``)::

    [[token]]
    name = "alice"        # the principal written to the audit log (never the token itself)
    role = "admin"        # admin | worker | ps | reader
    token = "..."         # or token_env = "VARIABLE" to read it from the environment
    member = "ps-0"       # optional (worker and ps roles): the member id(s) this token may act as:
                          # an exact id, or a prefix ending in "*" ("worker-*"); absent: any id

A ``worker`` or ``ps`` token may register only in its own role, and every call naming a member
(RegisterMember's member_id, a MemberRef, a PushHeader) must name one its ``member`` allows, or it
gets PERMISSION_DENIED and changes nothing. Registering with no member id (the coordinator assigns
``worker-N`` / ``ps-N``, never an existing id) is always allowed. Give each member its own bound
token (``lepton certs`` does) so that no member can register, heartbeat or deregister as another;
an unbound token trusts its holders with each other's ids.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import structlog

from lepton.errors import ConfigError
from lepton.handler_rewrap import rewrap

audit = structlog.get_logger("lepton.audit")

ROLES = ("admin", "worker", "ps", "reader")
_BINDABLE = frozenset({"worker", "ps"})
# The wire Role (lepton.v1.Role) each member role may register as.
_REGISTERS_AS = {"worker": 2, "ps": 1}  # ROLE_WORKER, ROLE_PARAMETER_SERVER
_ROLE_NAMES = {1: "ROLE_PARAMETER_SERVER", 2: "ROLE_WORKER"}
REGISTER_METHOD = "/lepton.v1.Coordinator/RegisterMember"
_ANYONE = frozenset(ROLES)
_MEMBERS = frozenset({"worker", "ps", "admin"})

# The one method-to-role table. admin may call everything; health and reflection need no token.
METHOD_ROLES: dict[str, frozenset[str]] = {
    "/lepton.v1.Coordinator/RegisterMember": _MEMBERS,
    "/lepton.v1.Coordinator/Heartbeat": _MEMBERS,
    "/lepton.v1.Coordinator/HeartbeatStream": _MEMBERS,
    "/lepton.v1.Coordinator/Deregister": _MEMBERS,
    "/lepton.v1.Coordinator/GetAssignment": frozenset({"ps", "admin"}),
    "/lepton.v1.Coordinator/ReportReady": frozenset({"ps", "admin"}),
    "/lepton.v1.Coordinator/GetLayout": _ANYONE,
    "/lepton.v1.Coordinator/LeaseShard": frozenset({"worker", "admin"}),
    "/lepton.v1.Coordinator/ReportProgress": frozenset({"worker", "admin"}),
    "/lepton.v1.Coordinator/CompleteShard": frozenset({"worker", "admin"}),
    "/lepton.v1.Coordinator/ReportEvaluation": frozenset({"worker", "admin"}),
    "/lepton.v1.Coordinator/DeclineEvaluation": frozenset({"worker", "admin"}),
    "/lepton.v1.Coordinator/GetStatus": _ANYONE,
    "/lepton.v1.Coordinator/WatchJob": _ANYONE,
    "/lepton.v1.Coordinator/CancelJob": frozenset({"admin"}),
    "/lepton.v1.Coordinator/ReportFailure": frozenset({"ps", "worker", "admin"}),  # worker: the evaluator
    "/lepton.v1.Coordinator/RequestCheckpoint": frozenset({"admin"}),
    "/lepton.v1.Coordinator/GetCheckpoint": _ANYONE,
    "/lepton.v1.ParameterServer/Pull": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/Push": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/PushPull": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/PushPullUnary": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/OpenSharedMemory": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/PushPullShared": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/CloseSharedMemory": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/LeaveSteps": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/JoinSteps": frozenset({"worker", "admin"}),
    "/lepton.v1.ParameterServer/GetServerStatus": _ANYONE,
}
ADMIN_METHODS = frozenset(m for m, roles in METHOD_ROLES.items() if roles == {"admin"})
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")


@dataclass(frozen=True)
class Principal:
    """Who a token speaks for: a name for the audit log, a role, and the member ids it may use
    (``member``: "" for any, an exact id, or a prefix ending in "*")."""

    name: str
    role: str
    member: str = ""

    def may_act_as(self, member_id: str) -> bool:
        if self.role == "admin" or not self.member:
            return True
        if self.member.endswith("*"):
            return member_id.startswith(self.member[:-1])
        return member_id == self.member


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class TokenTable:
    """Maps bearer tokens to principals; lookups compare every entry in constant time."""

    def __init__(self, entries: Mapping[str, Principal]) -> None:
        self._entries = [(_digest(token), principal) for token, principal in entries.items()]

    @classmethod
    def from_file(cls, path: str | Path, environ: Mapping[str, str] = os.environ) -> TokenTable:
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read auth file {path}: {exc}") from exc
        entries: dict[str, Principal] = {}
        for i, item in enumerate(data.get("token", [])):
            name, role = item.get("name", f"token-{i}"), item.get("role")
            if role not in ROLES:
                raise ConfigError(f"auth file {path}: token {name!r} has role {role!r}; roles are {ROLES}")
            token = item.get("token") or environ.get(item.get("token_env", ""), "")
            if len(token) < 16:
                raise ConfigError(f"auth file {path}: token {name!r} is missing or shorter than 16 characters")
            member = item.get("member", "")
            if not isinstance(member, str) or (member and role not in _BINDABLE):
                raise ConfigError(
                    f"auth file {path}: token {name!r}: member must be a string, for roles {sorted(_BINDABLE)}"
                )
            entries[token] = Principal(name, role, member)
        if not entries:
            raise ConfigError(f"auth file {path} defines no [[token]]")
        return cls(entries)

    def lookup(self, token: str) -> Principal | None:
        wanted = _digest(token)
        found = None
        for digest, principal in self._entries:
            if hmac.compare_digest(digest, wanted):  # no early exit: time does not depend on position
                found = principal
        return found


def _rejecting(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    def reject(_fn: Any) -> Any:
        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, details)

        return behaviour

    def reject_stream(_fn: Any) -> Any:
        def behaviour(request: Any, context: grpc.ServicerContext) -> Any:
            context.abort(code, details)
            yield  # pragma: no cover

        return behaviour

    return rewrap(handler, reject, reject_stream)


def _audited(handler: grpc.RpcMethodHandler, method: str, principal: Principal) -> grpc.RpcMethodHandler:
    """Writes an audit line with the outcome of an admin call."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            outcome = "UNKNOWN"
            try:
                result = fn(request, context)
                outcome = "OK"
                return result
            finally:
                code = context.code() if hasattr(context, "code") else None
                if code is not None:
                    outcome = code.name
                audit.info(
                    "audit", principal=principal.name, caller_role=principal.role, method=method, outcome=outcome
                )

        return call

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(
            wrap(handler.unary_unary), handler.request_deserializer, handler.response_serializer
        )
    return handler  # every admin RPC is unary today


def identity_violation(principal: Principal, method: str, request: Any) -> str | None:
    """Why ``principal`` may not send ``request`` to ``method`` (None if it may): the role it
    registers as, and every member id the request names, must be its own."""
    if principal.role not in _BINDABLE:
        return None
    named: list[str] = []
    if method == REGISTER_METHOD:
        wanted = _REGISTERS_AS[principal.role]
        if request.role != wanted:
            return (
                f"a {principal.role!r} token may register only as {_ROLE_NAMES[wanted]}, "
                f"not {_ROLE_NAMES.get(request.role, request.role)}"
            )
        named.append(request.member_id)
    fields = request.DESCRIPTOR.fields_by_name
    if "member" in fields and request.HasField("member"):
        named.append(request.member.member_id)
    if "header" in fields and request.HasField("header") and request.header.HasField("member"):
        named.append(request.header.member.member_id)
    if "heartbeat" in fields and request.HasField("heartbeat") and request.heartbeat.HasField("member"):
        named.append(request.heartbeat.member.member_id)  # HeartbeatStreamRequest
    for member_id in named:
        if member_id and not principal.may_act_as(member_id):
            return f"token {principal.name!r} may act only as member {principal.member!r}, not {member_id!r}"
    return None


def _bound(handler: grpc.RpcMethodHandler, method: str, principal: Principal) -> grpc.RpcMethodHandler:
    """Checks every request message against the principal's identity before the handler sees it."""

    def deny(context: grpc.ServicerContext, why: str) -> None:
        audit.warning(
            "audit", principal=principal.name, caller_role=principal.role, method=method, outcome="PERMISSION_DENIED",
            reason=why,
        )
        context.abort(grpc.StatusCode.PERMISSION_DENIED, why)

    def checked_stream(requests: Any, context: grpc.ServicerContext) -> Any:
        for request in requests:
            why = identity_violation(principal, method, request) if hasattr(request, "DESCRIPTOR") else None
            if why is not None:
                deny(context, why)
            yield request

    def unary(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if handler.request_streaming:
                return fn(checked_stream(request, context), context)
            why = identity_violation(principal, method, request) if hasattr(request, "DESCRIPTOR") else None
            if why is not None:
                deny(context, why)
            return fn(request, context)

        return call

    def stream(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            if handler.request_streaming:
                yield from fn(checked_stream(request, context), context)
                return
            why = identity_violation(principal, method, request) if hasattr(request, "DESCRIPTOR") else None
            if why is not None:
                deny(context, why)
            yield from fn(request, context)

        return call

    return rewrap(handler, unary, stream)


class AuthInterceptor(grpc.ServerInterceptor):
    """Checks the bearer token of every call against METHOD_ROLES, and the identity a member token
    is bound to against the request (``identity_violation``). Missing or unknown token:
    UNAUTHENTICATED; known token without the role or naming another member: PERMISSION_DENIED.
    Health and reflection are open so that probes work. Every failure and every admin call is
    audited."""

    def __init__(self, tokens: TokenTable, method_roles: Mapping[str, frozenset[str]] = METHOD_ROLES) -> None:
        self._tokens = tokens
        self._roles = method_roles

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None or method.startswith(OPEN_PREFIXES):
            return handler
        metadata = dict(handler_call_details.invocation_metadata or ())
        header = metadata.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        principal = self._tokens.lookup(token) if token else None
        if principal is None:
            audit.warning("audit", principal="anonymous", method=method, outcome="UNAUTHENTICATED")
            return _rejecting(handler, grpc.StatusCode.UNAUTHENTICATED, "missing or invalid bearer token")
        allowed = self._roles.get(method, frozenset({"admin"}))
        if principal.role != "admin" and principal.role not in allowed:
            audit.warning(
                "audit",
                principal=principal.name,
                caller_role=principal.role,
                method=method,
                outcome="PERMISSION_DENIED",
            )
            return _rejecting(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                f"role {principal.role!r} may not call {method}; it needs one of {sorted(allowed)}",
            )
        if method in ADMIN_METHODS:
            return _audited(handler, method, principal)
        if principal.role in _BINDABLE:
            return _bound(handler, method, principal)
        return handler
