"""Transport security: TLS (mutual when servers are given a CA), the bearer token a client sends,
and the rule that a server does not serve plaintext beyond loopback unless told to.

Tokens come from files or the environment, never from the command line. A client sends
``authorization: Bearer <token>`` read from ``--token-file`` or ``LEPTON_TOKEN``; a server checks
tokens against the table ``lepton.auth`` reads (``--auth-file`` or ``LEPTON_AUTH_FILE``).
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from lepton.auth import AuthInterceptor, TokenTable
from lepton.errors import ConfigError


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details):  # type: ignore[no-untyped-def]
        metadata = list(details.metadata or []) + [self._header]
        return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)

    def intercept_stream_stream(self, continuation, details, requests):  # type: ignore[no-untyped-def]
        return continuation(self._details(details), requests)


class _Details(grpc.ClientCallDetails):
    def __init__(self, base, metadata) -> None:  # type: ignore[no-untyped-def]
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


def _read(path: str | None, what: str) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from exc


@dataclass(frozen=True)
class Security:
    """TLS files and tokens of one process, for its server side and its client side.

    Attributes:
        tls_cert, tls_key: this process's certificate chain and key (PEM). A server needs both to
            serve TLS; a client presents them for mutual TLS.
        tls_ca: CA bundle (PEM). Clients verify servers with it; a server given one requires and
            verifies client certificates (mutual TLS).
        token: the bearer token this process sends as a client.
        auth: the token table a server checks; None serves without authentication.
    """

    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None
    token: str | None = None
    auth: TokenTable | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together")

    @property
    def tls(self) -> bool:
        return bool(self.tls_ca or self.tls_cert)

    def server_credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls_cert:
            return None
        pair = (_read(self.tls_key, "TLS key"), _read(self.tls_cert, "TLS certificate"))
        ca = _read(self.tls_ca, "CA bundle")
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.tls_ca, "CA bundle"),
            private_key=_read(self.tls_key, "TLS key"),
            certificate_chain=_read(self.tls_cert, "TLS certificate"),
        )

    def client_interceptors(self) -> list:
        return [_BearerInterceptor(self.token)] if self.token else []

    def server_interceptors(self) -> list:
        return [AuthInterceptor(self.auth)] if self.auth is not None else []


INSECURE = Security()

_LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost", "ip6-loopback"})


def is_loopback(host: str) -> bool:
    """Whether ``host`` (of a listen address) reaches this machine only. The wildcard ("", 0.0.0.0,
    [::]) and every name but localhost count as reachable from the network."""
    host = host.strip("[]").lower()
    if host in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(listen: str, security: Security, insecure: bool) -> bool:
    """Refuses plaintext on an address other machines can reach, unless ``insecure`` says the
    operator accepts it (as etcd and the Kubernetes components ask). Returns whether the server will
    serve plaintext to the network (the caller logs a warning).

    Raises:
        ConfigError: plaintext on a non-loopback address without ``insecure``.
    """
    host = listen.rsplit(":", 1)[0]
    if security.tls_cert or is_loopback(host):
        return False
    if not insecure:
        raise ConfigError(
            f"refusing to serve plaintext on {listen}, an address other machines can reach: give "
            "--tls-cert and --tls-key (with --tls-ca to require client certificates), listen on "
            "127.0.0.1, or pass --insecure to accept that anyone on the network can read and make "
            "every call"
        )
    return True


def load_security(
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_ca: str | None = None,
    token_file: str | None = None,
    auth_file: str | None = None,
    environ: Mapping[str, str] = os.environ,
) -> Security:
    """Builds Security from flags and the environment (LEPTON_TOKEN, LEPTON_AUTH_FILE)."""
    token = None
    if token_file:
        raw = _read(token_file, "token file")
        token = raw.decode().strip() if raw else None
    elif environ.get("LEPTON_TOKEN"):
        token = environ["LEPTON_TOKEN"].strip()
    auth_path = auth_file or environ.get("LEPTON_AUTH_FILE")
    auth = TokenTable.from_file(auth_path, environ) if auth_path else None
    return Security(tls_cert, tls_key, tls_ca, token, auth)
