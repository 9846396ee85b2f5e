"""Member tokens bound to ids, the plaintext-exposure check, and the files `lepton certs` writes."""

from __future__ import annotations

import stat

import pytest

from lepton.auth import Principal, TokenTable, identity_violation
from lepton.errors import ConfigError
from lepton.ops.certs import make_dev_pki
from lepton.security import INSECURE, Security, check_exposure, is_loopback
from lepton.v1 import common_pb2 as common
from lepton.v1 import coordinator_pb2 as cpb
from lepton.v1 import parameter_server_pb2 as ppb

REGISTER = "/lepton.v1.Coordinator/RegisterMember"
HEARTBEAT = "/lepton.v1.Coordinator/Heartbeat"


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.9", "localhost", "[::1]", "::1"])
def test_loopback_hosts_are_recognised(host):
    assert is_loopback(host)


@pytest.mark.parametrize("host", ["0.0.0.0", "", "[::]", "10.0.0.5", "coordinator", "example.com"])
def test_wildcards_addresses_and_names_count_as_reachable(host):
    assert not is_loopback(host)


def test_plaintext_on_a_reachable_address_is_refused_unless_insecure_is_said():
    with pytest.raises(ConfigError, match=r"refusing to serve plaintext on 0.0.0.0:7000.*--insecure"):
        check_exposure("0.0.0.0:7000", INSECURE, insecure=False)
    assert check_exposure("0.0.0.0:7000", INSECURE, insecure=True) is True  # allowed, and warned about
    assert check_exposure("127.0.0.1:0", INSECURE, insecure=False) is False
    tls = Security(tls_cert="node.pem", tls_key="node-key.pem")
    assert check_exposure("0.0.0.0:7000", tls, insecure=False) is False


def register(role: int, member_id: str = "") -> cpb.RegisterMemberRequest:
    return cpb.RegisterMemberRequest(role=role, member_id=member_id, address="x:1")


def heartbeat(member_id: str) -> cpb.HeartbeatRequest:
    return cpb.HeartbeatRequest(member=common.MemberRef(member_id=member_id, incarnation=1))


def test_a_worker_token_cannot_register_as_a_parameter_server():
    for member in ("", "worker-*", "worker-1"):
        why = identity_violation(
            Principal("w", "worker", member), REGISTER, register(common.ROLE_PARAMETER_SERVER, "ps-0")
        )
        assert why and "may register only as ROLE_WORKER" in why
    assert identity_violation(Principal("p", "ps", "ps-0"), REGISTER, register(common.ROLE_WORKER)) is not None


def test_a_bound_token_names_only_its_own_member():
    w1 = Principal("worker-1", "worker", "worker-1")
    assert identity_violation(w1, REGISTER, register(common.ROLE_WORKER, "worker-1")) is None
    assert identity_violation(w1, REGISTER, register(common.ROLE_WORKER)) is None  # a fresh id takes over nobody
    assert "not 'worker-2'" in identity_violation(w1, REGISTER, register(common.ROLE_WORKER, "worker-2"))
    assert identity_violation(w1, HEARTBEAT, heartbeat("worker-1")) is None
    assert identity_violation(w1, HEARTBEAT, heartbeat("worker-2")) is not None
    push = ppb.PushRequest(header=ppb.PushHeader(member=common.MemberRef(member_id="worker-2", incarnation=1)))
    assert identity_violation(w1, "/lepton.v1.ParameterServer/Push", push) is not None


def test_a_prefix_binding_keeps_workers_off_server_ids_and_admin_and_readers_are_not_bound():
    workers = Principal("worker", "worker", "worker-*")
    assert identity_violation(workers, HEARTBEAT, heartbeat("worker-7")) is None
    assert identity_violation(workers, HEARTBEAT, heartbeat("ps-0")) is not None
    assert (
        identity_violation(Principal("root", "admin"), REGISTER, register(common.ROLE_PARAMETER_SERVER, "ps-0")) is None
    )
    assert identity_violation(Principal("anyone", "worker"), HEARTBEAT, heartbeat("ps-0")) is None  # unbound


def test_the_auth_file_reads_bindings_and_rejects_them_on_roles_without_members(tmp_path):
    path = tmp_path / "auth.toml"
    path.write_text('[[token]]\nname = "w1"\nrole = "worker"\ntoken = "0123456789abcdef0"\nmember = "worker-1"\n')
    assert TokenTable.from_file(path).lookup("0123456789abcdef0") == Principal("w1", "worker", "worker-1")
    path.write_text('[[token]]\nname = "r"\nrole = "reader"\ntoken = "0123456789abcdef0"\nmember = "worker-1"\n')
    with pytest.raises(ConfigError, match="member must be a string, for roles"):
        TokenTable.from_file(path)


def test_certs_writes_every_file_0600_with_member_tokens_bound_to_their_ids(tmp_path):
    files = make_dev_pki(tmp_path / "pki", ["localhost"], parameter_servers=2, workers=2)
    for path in (tmp_path / "pki").iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    table = TokenTable.from_file(files["auth"], environ={})
    principal = lambda name: table.lookup(files[f"{name}-token"].read_text().strip())  # noqa: E731
    assert principal("ps-1") == Principal("ps-1", "ps", "ps-1")
    assert principal("worker-0") == Principal("worker-0", "worker", "worker-0")
    assert principal("worker") == Principal("worker", "worker", "worker-*")
    assert principal("ps") == Principal("ps", "ps", "ps-*")
    assert principal("admin") == Principal("admin", "admin") and principal("reader") == Principal("reader", "reader")
