"""gRPC's own native log lines (plain text from the C core, e.g. a TLS handshake that failed) stay
out of a Lepton process's stderr unless GRPC_VERBOSITY asks for them."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lepton.ops.certs import make_dev_pki

SCRIPT = r"""
import socket, sys
import lepton  # sets GRPC_VERBOSITY=NONE unless it is set
from lepton.rpc import Server
from lepton.security import Security

pki = sys.argv[1]
server = Server("127.0.0.1:0", [], security=Security(tls_cert=f"{pki}/node.pem", tls_key=f"{pki}/node-key.pem"),
                reflection_enabled=False)
server.start()
with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
    plain.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(64))  # plaintext to a TLS port
    while plain.recv(4096):  # the server closes the connection once the handshake failed
        pass
server.stop(0)
print("done", flush=True)
"""


@pytest.mark.parametrize("verbosity, shown", [(None, False), ("INFO", True)])
def test_a_failed_tls_handshake_is_not_logged_by_grpc_unless_asked(tmp_path, verbosity, shown):
    pki = tmp_path / "pki"
    make_dev_pki(pki, ["127.0.0.1", "localhost"], parameter_servers=0, workers=0)
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    if verbosity:
        env["GRPC_VERBOSITY"] = verbosity
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(pki)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "done" in result.stdout, result.stderr
    assert ("Handshake failed" in result.stderr) is shown, result.stderr
