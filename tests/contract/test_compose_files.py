"""The compose files, read statically (no Docker engine needed): the secure variant mounts each
secret only where it is used, and the plain variant says --insecure where it serves plaintext to the
project's network (issue 12, item 10)."""

from __future__ import annotations

import re
import stat
from pathlib import Path

import pytest
import yaml

from lepton.ops.certs import make_dev_pki
from lepton.ops.cli import build_parser, service_options

DOCKER = Path(__file__).resolve().parents[2] / "docker"
SECURE = yaml.safe_load((DOCKER / "docker-compose.secure.yml").read_text())["services"]
PLAIN = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]
SECRETS = "${LEPTON_SECRETS_DIR:?set LEPTON_SECRETS_DIR}"
NEVER_MOUNTED = {"ca-key.pem", "admin.token", "reader.token"}


def secret_mounts(service: dict) -> dict[str, str]:
    """Container path -> secret file name, for every volume taken from the secrets directory."""
    mounts = {}
    for volume in service.get("volumes", []):
        source, target, mode = re.fullmatch(r"(\$\{[^}]*\}[^:]*|[^:]+):([^:]+)(?::(\w+))?", volume).groups()
        if source.startswith("${LEPTON_SECRETS_DIR"):
            assert source.startswith(SECRETS + "/"), f"a whole secrets directory is mounted: {volume}"
            assert mode == "ro", volume
            mounts[target] = source[len(SECRETS) + 1 :]
    return mounts


def flag_paths(command: list[str]) -> dict[str, str]:
    return {
        flag: value
        for flag, _, value in (a.partition("=") for a in command)
        if flag in ("--tls-ca", "--tls-cert", "--tls-key", "--auth-file", "--token-file")
    }


@pytest.mark.parametrize("name", sorted(SECURE))
def test_each_secure_service_mounts_exactly_the_secret_files_its_flags_name(name):
    service = SECURE[name]
    mounts = secret_mounts(service)
    used = flag_paths(service["command"])
    assert set(mounts) == set(used.values()), f"{name}: mounted {sorted(mounts)}, used {sorted(used.values())}"
    assert not NEVER_MOUNTED & set(mounts.values())
    assert all(Path(target).name == source for target, source in mounts.items())


def test_secure_servers_check_tokens_and_members_send_their_own():
    assert "--token-file" not in flag_paths(SECURE["coordinator"]["command"])  # a server only
    for ps in ("ps-0", "ps-1"):
        command = SECURE[ps]["command"]
        assert f"--id={ps}" in command
        assert flag_paths(command)["--token-file"] == f"/etc/lepton/{ps}.token"  # bound to its own id
    assert flag_paths(SECURE["worker"]["command"])["--token-file"] == "/etc/lepton/worker.token"
    for name in ("coordinator", "ps-0", "ps-1"):
        assert flag_paths(SECURE[name]["command"])["--auth-file"] == "/etc/lepton/auth.toml"
    assert "auth.toml" not in secret_mounts(SECURE["worker"]).values()


def test_every_file_the_secure_compose_mounts_is_made_by_lepton_certs_and_is_0600(tmp_path):
    files = make_dev_pki(tmp_path, ["localhost", "127.0.0.1", "coordinator", "ps-0", "ps-1"])
    made = {path.name: path for path in files.values()}
    for name, service in SECURE.items():
        for source in secret_mounts(service).values():
            assert source in made, f"{name} mounts {source}, which lepton certs does not make"
            assert stat.S_IMODE(made[source].stat().st_mode) == 0o600


@pytest.mark.parametrize("name", ["coordinator", "ps-0", "ps-1"])
def test_plain_compose_servers_on_the_project_network_say_insecure(name):
    argv = [re.sub(r"\$\{[^}]*\}", "1", a) for a in PLAIN[name]["command"]]
    assert any(a.startswith("--listen=0.0.0.0:") for a in argv) and "--insecure" in argv
    service_options(build_parser().parse_args(argv))  # accepted as written
    without = [a for a in argv if a != "--insecure"]
    with pytest.raises(Exception, match="refusing to serve plaintext"):
        service_options(build_parser().parse_args(without))
