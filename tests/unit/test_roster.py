"""The parameter server's worker roster: fencing against the coordinator's last published view."""

from __future__ import annotations

import pytest

from lepton.errors import Fenced, NotFound
from ps_server.roster import WorkerEntry, WorkerRoster


@pytest.fixture
def roster() -> WorkerRoster:
    r = WorkerRoster()
    live = r.update([WorkerEntry("w-0", 2, True), WorkerEntry("w-1", 1, False), WorkerEntry("w-2", 1, True)])
    assert live == {"w-0", "w-2"}
    return r


def test_a_current_live_worker_passes(roster):
    assert roster.check("w-0", 2) is True
    roster.check_final("w-2", 1)
    assert roster.fenced_rejections == 0


def test_an_older_incarnation_is_fenced_and_counted(roster):
    with pytest.raises(Fenced):
        roster.check("w-0", 1)
    assert roster.fenced_rejections == 1


def test_a_worker_the_coordinator_declared_dead_is_fenced(roster):
    with pytest.raises(Fenced):
        roster.check("w-1", 1)
    with pytest.raises(Fenced):
        roster.check_final("w-1", 1)
    assert roster.fenced_rejections == 2


def test_an_unknown_worker_or_newer_incarnation_may_mean_the_view_is_out_of_date(roster):
    assert roster.check("w-9", 1) is False
    assert roster.check("w-0", 3) is False
    assert roster.fenced_rejections == 0


def test_check_final_turns_an_unknown_identity_into_not_found(roster):
    with pytest.raises(NotFound):
        roster.check_final("w-9", 1)
    with pytest.raises(NotFound):
        roster.check_final("w-0", 3)


def test_update_replaces_the_whole_view(roster):
    live = roster.update([WorkerEntry("w-0", 3, True)])
    assert live == {"w-0"} and roster.live() == {"w-0"}
    assert roster.check("w-2", 1) is False  # forgotten, not fenced
    with pytest.raises(Fenced):
        roster.check("w-0", 2)


def test_an_empty_roster_knows_nobody():
    r = WorkerRoster()
    assert r.live() == set()
    assert r.check("w-0", 1) is False
