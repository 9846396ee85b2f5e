"""A tiny ``grpc.health.v1`` probe, shipped in the image for container health checks.

    lepton healthcheck HOST:PORT [--service NAME] [--timeout S]
        [--tls-ca PEM [--tls-cert PEM --tls-key PEM]]

``python -m lepton.healthcheck`` takes the same arguments.

Exits 0 when the server answers SERVING for ``NAME`` (default: the overall health, ""), 1 for
anything else: NOT_SERVING, SERVICE_UNKNOWN, an unknown service (NOT_FOUND), no answer within the
timeout, or a refused connection. One line goes to stdout (SERVING) or stderr (everything else).

It imports only grpc and the health stubs (no torch), so a probe costs a fraction of a second.
"""

from __future__ import annotations

import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

EXIT_SERVING = 0
EXIT_NOT_SERVING = 1


def _channel(address: str, ca: str | None, cert: str | None, key: str | None) -> grpc.Channel:
    if not ca:
        return grpc.insecure_channel(address)
    read = lambda path: open(path, "rb").read() if path else None  # noqa: E731
    creds = grpc.ssl_channel_credentials(read(ca), read(key), read(cert))
    return grpc.secure_channel(address, creds)


def check(
    address: str,
    service: str = "",
    timeout_s: float = 3.0,
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
) -> tuple[bool, str]:
    """(serving, description) for one Health/Check call to ``address``; never raises for RPC errors.
    Health needs no token; with TLS (and mutual TLS) the CA and this probe's certificate are given."""
    try:
        with _channel(address, tls_ca, tls_cert, tls_key) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        details = exc.details() if hasattr(exc, "details") else str(exc)
        return False, f"{code.name if code else 'ERROR'}: {details}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The probe's flags, shared by ``python -m lepton.healthcheck`` and ``lepton healthcheck``."""
    parser.add_argument("address", metavar="HOST:PORT")
    parser.add_argument("--service", default="", help='service name to check (default "": the whole server)')
    parser.add_argument("--timeout", type=float, default=3.0, metavar="S", help="seconds to wait (default 3)")
    parser.add_argument("--tls-ca", default=None, metavar="PEM", help="verify a TLS server with this CA")
    parser.add_argument("--tls-cert", default=None, metavar="PEM", help="client certificate (mutual TLS)")
    parser.add_argument("--tls-key", default=None, metavar="PEM", help="client key (mutual TLS)")


def probe(args: argparse.Namespace) -> int:
    """One check with the parsed flags; prints its line and returns the exit code."""
    serving, what = check(args.address, args.service, args.timeout, args.tls_ca, args.tls_cert, args.tls_key)
    label = f"{args.address}" + (f" [{args.service}]" if args.service else "")
    if serving:
        print(f"{label}: {what}")
        return EXIT_SERVING
    print(f"{label}: {what}", file=sys.stderr)
    return EXIT_NOT_SERVING


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m lepton.healthcheck",
        description="Exit 0 if the gRPC server at HOST:PORT reports SERVING (grpc.health.v1), else 1.",
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    return probe(args)
