"""``lepton certs``: a development PKI and role tokens for a secured cluster.

Writes into one directory: ``ca.pem`` / ``ca-key.pem`` (a self-signed CA), ``node.pem`` /
``node-key.pem`` (one certificate for every service, valid for server and client authentication,
covering the given DNS names and IPs), ``auth.toml`` (the token table servers check) and one
``<role>.token`` file per role for clients. For development and tests, not for production PKI.
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

from lepton.security import ROLES

VALIDITY = datetime.timedelta(days=30)


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.write_bytes(data)
    if private:
        os.chmod(path, 0o600)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def make_dev_pki(out: str | Path, hosts: list[str]) -> dict[str, Path]:
    """Creates the files described above; returns their paths by name."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

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
    _write(files["ca-key"], _key_pem(ca_key), private=True)
    _write(files["cert"], node.public_bytes(serialization.Encoding.PEM))
    _write(files["key"], _key_pem(node_key), private=True)
    table = []
    for role in ROLES:
        token = secrets.token_urlsafe(32)
        path = out / f"{role}.token"
        _write(path, token.encode() + b"\n", private=True)
        files[f"{role}-token"] = path
        table.append(f'[[token]]\nname = "{role}"\nrole = "{role}"\ntoken = "{token}"\n')
    _write(files["auth"], "\n".join(table).encode(), private=True)
    return files
