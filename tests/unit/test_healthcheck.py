"""``python -m lepton.healthcheck`` against a real in-process gRPC server on 127.0.0.1:0."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent import futures

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from lepton.healthcheck import check, main

SERVICE = "lepton.v1.Example"


@pytest.fixture
def health_server():
    """A real server with only the standard health service; yields (address, servicer)."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        server.stop(0).wait(5)


def test_serving_server_exits_0(health_server, capsys):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert main([address, "--timeout", "5"]) == 0
    assert "SERVING" in capsys.readouterr().out


def test_not_serving_server_exits_1(health_server, capsys):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([address, "--timeout", "5"]) == 1
    assert "NOT_SERVING" in capsys.readouterr().err


def test_per_service_status_and_unknown_service(health_server):
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert main([address, "--service", SERVICE, "--timeout", "5"]) == 1
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.SERVING)
    assert main([address, "--service", SERVICE, "--timeout", "5"]) == 0
    serving, what = check(address, "no.such.Service", 5)
    assert not serving and what.startswith("NOT_FOUND")


def test_graceful_shutdown_reads_as_not_serving(health_server):
    """What a Lepton server does on SIGTERM (``Server.stop``): every status flips to NOT_SERVING."""
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    servicer.enter_graceful_shutdown()
    assert main([address, "--timeout", "5"]) == 1


def test_nothing_listening_exits_1_within_the_timeout():
    with socket.socket() as s:  # a port that was free a moment ago, on loopback only
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    started = time.monotonic()
    assert main([address, "--timeout", "2"]) == 1
    assert time.monotonic() - started < 10


def test_runs_as_a_module(health_server):
    """The exact command line the compose health checks run."""
    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    argv = [sys.executable, "-m", "lepton.healthcheck", address, "--timeout", "5"]
    assert subprocess.run(argv, capture_output=True, timeout=60).returncode == 0
    servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "NOT_SERVING" in done.stderr


def test_the_lepton_healthcheck_subcommand(health_server, capsys):
    """``lepton healthcheck`` is the same probe: 0 for SERVING, 1 otherwise, 2 for a bad timeout."""
    from lepton.ops.cli import main as lepton

    address, servicer = health_server
    servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    assert lepton(["healthcheck", address, "--timeout", "5"]) == 0
    assert f"{address}: SERVING" in capsys.readouterr().out
    servicer.set(SERVICE, health_pb2.HealthCheckResponse.NOT_SERVING)
    assert lepton(["healthcheck", address, "--service", SERVICE, "--timeout", "5"]) == 1
    assert f"{address} [{SERVICE}]: NOT_SERVING" in capsys.readouterr().err
    assert lepton(["healthcheck", address, "--timeout", "0"]) == 2
    assert "--timeout must be > 0" in capsys.readouterr().err
