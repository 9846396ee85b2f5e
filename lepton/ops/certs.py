"""``lepton certs``: a development PKI and role tokens for a secured cluster.

Writes into one directory: ``ca.pem`` / ``ca-key.pem`` (a self-signed CA), ``node.pem`` /
``node-key.pem`` (one certificate for every service, valid for server and client authentication,
covering the given DNS names and IPs), ``auth.toml`` (the token table servers check), one
``<role>.token`` file per role for clients, and one token per member bound to its id:
``ps-<i>.token`` (member ``ps-<i>``) and ``worker-<i>.token`` (member ``worker-<i>``). The role
tokens of members are bound too: ``ps.token`` to ``ps-*``, ``worker.token`` to ``worker-*``, so a
worker's token can never act as a parameter server; only per-member tokens stop members of one role
acting as each other. Every file is 0600: who needs one gets it mounted on its own (see
docker/docker-compose.secure.yml); ``ca-key.pem`` is needed by nobody at run time. For development
and tests, not for production PKI.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lepton.auth import ROLES

VALIDITY = datetime.timedelta(days=30)


def _write(path: Path, data: bytes) -> None:
    """Writes ``data`` to a file only its owner can read, from the moment it exists."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)  # whatever the umask


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def make_dev_pki(
    out: str | Path, hosts: list[str], parameter_servers: int = 2, workers: int = 3
) -> dict[str, Path]:
    """Creates the files described above, with member tokens for ``parameter_servers`` servers and
    ``workers`` workers; returns their paths by name (``"<role>-token"``, ``"ps-0-token"``, ...)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Lepton development CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )
        .sign(ca_key, hashes.SHA256())
    )

    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    node_key = ec.generate_private_key(ec.SECP256R1())
    node = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "lepton")]))
        .issuer_name(ca_name)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )

    files = {
        "ca": out / "ca.pem",
        "ca-key": out / "ca-key.pem",
        "cert": out / "node.pem",
        "key": out / "node-key.pem",
        "auth": out / "auth.toml",
    }
    _write(files["ca"], ca.public_bytes(serialization.Encoding.PEM))
    _write(files["ca-key"], _key_pem(ca_key))
    _write(files["cert"], node.public_bytes(serialization.Encoding.PEM))
    _write(files["key"], _key_pem(node_key))
    holders = [(role, role, {"ps": "ps-*", "worker": "worker-*"}.get(role, "")) for role in ROLES]
    holders += [(f"ps-{i}", "ps", f"ps-{i}") for i in range(parameter_servers)]
    holders += [(f"worker-{i}", "worker", f"worker-{i}") for i in range(workers)]
    table = []
    for name, role, member in holders:
        token = secrets.token_urlsafe(32)
        path = out / f"{name}.token"
        _write(path, token.encode() + b"\n")
        files[f"{name}-token"] = path
        bound = f'member = "{member}"\n' if member else ""
        table.append(f'[[token]]\nname = "{name}"\nrole = "{role}"\ntoken = "{token}"\n{bound}')
    _write(files["auth"], "\n".join(table).encode())
    return files
