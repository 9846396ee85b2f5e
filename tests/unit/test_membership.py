"""The membership table: identities, incarnations, fencing and heartbeat expiry on a fake clock."""

from __future__ import annotations

import pytest

from coordinator.membership import MembershipTable, Role
from lepton.clock import FakeClock
from lepton.errors import Fenced, InvalidArgument, NotFound

TIMEOUT_S = 3.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def table() -> MembershipTable:
    return MembershipTable(heartbeat_timeout_s=TIMEOUT_S)


def test_register_assigns_fresh_ids_per_role_at_incarnation_one(table, clock):
    ps0 = table.register(Role.PARAMETER_SERVER, "h:1", clock.now())
    w0 = table.register(Role.WORKER, "", clock.now())
    w1 = table.register(Role.WORKER, "", clock.now())
    ps1 = table.register(Role.PARAMETER_SERVER, "h:2", clock.now())
    assert [m.member_id for m in (ps0, ps1, w0, w1)] == ["ps-0", "ps-1", "worker-0", "worker-1"]
    assert {m.incarnation for m in (ps0, ps1, w0, w1)} == {1}
    assert all(m.alive and not m.departed for m in (ps0, ps1, w0, w1))
    assert ps0.last_heartbeat == clock.now() and ps1.address == "h:2"


def test_register_keeps_a_chosen_id_and_fresh_ids_skip_it(table, clock):
    chosen = table.register(Role.WORKER, "", clock.now(), member_id="worker-0", hostname="box", pid=42)
    fresh = table.register(Role.WORKER, "", clock.now())
    assert (chosen.member_id, chosen.incarnation, chosen.hostname, chosen.pid) == ("worker-0", 1, "box", 42)
    assert fresh.member_id == "worker-1"


def test_re_register_under_the_same_id_bumps_the_incarnation_and_fences_the_old_one(table, clock):
    old = table.register(Role.WORKER, "", clock.now())
    new = table.register(Role.WORKER, "", clock.now(), member_id=old.member_id)
    assert (new.member_id, new.incarnation) == (old.member_id, 2)
    assert table.check(old.member_id, 2) is new
    with pytest.raises(Fenced, match="superseded by incarnation 2"):
        table.check(old.member_id, 1)
    with pytest.raises(Fenced):
        table.heartbeat(old.member_id, 1, clock.now())
    assert len(table.members()) == 1


def test_re_register_under_another_role_is_invalid(table, clock):
    w = table.register(Role.WORKER, "", clock.now())
    with pytest.raises(InvalidArgument):
        table.register(Role.PARAMETER_SERVER, "h:1", clock.now(), member_id=w.member_id)
    assert table.check(w.member_id, 1) is w


def test_unknown_id_is_not_found(table, clock):
    with pytest.raises(NotFound):
        table.check("worker-7", 1)
    with pytest.raises(NotFound):
        table.heartbeat("worker-7", 1, clock.now())
    with pytest.raises(NotFound):
        table.depart("worker-7", 1)
    assert table.get("worker-7") is None


def test_expire_returns_exactly_the_members_silent_longer_than_the_timeout(table, clock):
    a = table.register(Role.WORKER, "", clock.now())  # t0
    clock.advance(1.0)
    b = table.register(Role.WORKER, "", clock.now())  # t0+1
    clock.advance(1.0)
    c = table.register(Role.PARAMETER_SERVER, "h:1", clock.now())  # t0+2
    clock.advance(TIMEOUT_S - 1.0)  # a silent 4 s, b exactly 3 s, c 2 s
    assert table.expire(clock.now()) == [a]
    assert not a.alive and b.alive and c.alive
    clock.advance(0.001)  # b just past
    assert table.expire(clock.now()) == [b]
    assert table.expire(clock.now()) == []  # each death is reported once
    assert table.alive() == [c]


def test_a_member_exactly_at_the_timeout_is_still_alive(table, clock):
    m = table.register(Role.WORKER, "", clock.now())
    assert table.expire(clock.now() + TIMEOUT_S) == []
    assert m.alive


def test_heartbeats_keep_a_member_alive(table, clock):
    m = table.register(Role.WORKER, "", clock.now())
    for _ in range(5):
        clock.advance(TIMEOUT_S * 0.9)
        table.heartbeat(m.member_id, m.incarnation, clock.now())
        assert table.expire(clock.now()) == []
    assert m.alive and m.last_heartbeat == clock.now()


def test_an_expired_member_is_fenced_until_it_re_registers(table, clock):
    m = table.register(Role.WORKER, "", clock.now())
    clock.advance(TIMEOUT_S + 1)
    assert table.expire(clock.now()) == [m]
    with pytest.raises(Fenced, match="declared dead"):
        table.heartbeat(m.member_id, 1, clock.now())
    again = table.register(Role.WORKER, "", clock.now(), member_id=m.member_id)
    assert again.incarnation == 2 and again.alive
    assert table.check(m.member_id, 2) is again


def test_depart_fences_the_member_and_it_never_expires(table, clock):
    m = table.register(Role.WORKER, "", clock.now())
    table.depart(m.member_id, 1)
    assert not m.alive and m.departed
    with pytest.raises(Fenced, match="departed"):
        table.check(m.member_id, 1)
    with pytest.raises(Fenced):
        table.depart(m.member_id, 1)
    clock.advance(TIMEOUT_S * 10)
    assert table.expire(clock.now()) == []


def test_members_and_alive_filter_by_role(table, clock):
    ps = table.register(Role.PARAMETER_SERVER, "h:1", clock.now())
    w0 = table.register(Role.WORKER, "", clock.now())
    w1 = table.register(Role.WORKER, "", clock.now())
    table.depart(w0.member_id, 1)
    assert table.members(Role.WORKER) == [w0, w1]
    assert table.alive(Role.WORKER) == [w1]
    assert table.alive(Role.PARAMETER_SERVER) == [ps]
    assert table.members() == [ps, w0, w1]


@pytest.mark.parametrize("timeout_s", [0.0, -1.0])
def test_a_non_positive_timeout_is_invalid(timeout_s):
    with pytest.raises(InvalidArgument):
        MembershipTable(heartbeat_timeout_s=timeout_s)


def test_an_incarnation_never_issued_is_unknown_not_superseded():
    table = MembershipTable(heartbeat_timeout_s=3.0)
    member = table.register(Role.WORKER, "", now=0.0)
    with pytest.raises(NotFound, match="incarnation 7 is unknown: it was never issued"):
        table.heartbeat(member.member_id, 7, now=1.0)
    assert table.fenced_rejections == 0 and table.get(member.member_id).last_heartbeat == 0.0
