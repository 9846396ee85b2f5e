"""The shard ledger: splitting, leasing, progress, exactly-once completion and requeueing."""

from __future__ import annotations

from itertools import pairwise

import pytest

from coordinator.ledger import Shard, ShardLedger, split
from lepton.errors import DuplicateCompletion, FailedPrecondition, InvalidArgument, NotFound


def finish_epoch(ledger: ShardLedger, member: str = "w-0", incarnation: int = 1) -> None:
    epoch = ledger.epoch
    while ledger.epoch == epoch:
        lease = ledger.lease(member, incarnation)
        assert lease is not None
        ledger.complete(member, incarnation, lease.epoch, lease.shard.index)


# --- split -------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_samples,num_shards", [(10, 3), (12, 4), (7, 7), (100, 1), (5, 9), (1, 1)])
def test_split_covers_the_range_contiguously_with_near_equal_shards(num_samples, num_shards):
    shards = split(num_samples, num_shards)
    assert len(shards) == min(num_samples, num_shards)
    assert [s.index for s in shards] == list(range(len(shards)))
    assert shards[0].start == 0 and shards[-1].end == num_samples
    for a, b in pairwise(shards):
        assert a.end == b.start
    sizes = [s.size for s in shards]
    assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
    assert sum(sizes) == num_samples


def test_split_of_ten_into_three_puts_the_remainder_first():
    assert split(10, 3) == [Shard(0, 0, 4), Shard(1, 4, 7), Shard(2, 7, 10)]


def test_split_of_an_empty_training_set_is_invalid():
    with pytest.raises(InvalidArgument):
        split(0, 3)


# --- leasing, progress, completion -------------------------------------------------------------


def test_leases_come_from_the_queue_in_shard_order_at_offset_zero():
    ledger = ShardLedger(30, 3, epochs=1)
    a = ledger.lease("w-0", 1)
    b = ledger.lease("w-1", 1)
    assert (a.shard.index, a.offset, a.epoch, a.member_id, a.incarnation) == (0, 0, 0, "w-0", 1)
    assert (b.shard.index, b.offset) == (1, 0)
    assert (ledger.pending, ledger.leased, ledger.done_in_epoch) == (1, 2, 0)


def test_a_retried_lease_by_the_same_incarnation_returns_the_same_lease():
    ledger = ShardLedger(30, 3, epochs=1)
    first = ledger.lease("w-0", 1)
    again = ledger.lease("w-0", 1)
    assert again is first
    assert (ledger.pending, ledger.leased) == (2, 1)


def test_lease_returns_none_when_every_shard_is_out():
    ledger = ShardLedger(2, 2, epochs=1)
    ledger.lease("w-0", 1)
    ledger.lease("w-1", 1)
    assert ledger.lease("w-2", 1) is None


def test_progress_returns_the_samples_newly_trained():
    ledger = ShardLedger(30, 3, epochs=1)
    lease = ledger.lease("w-0", 1)
    assert ledger.progress("w-0", 1, 0, lease.shard.index, 4) == 4
    assert ledger.progress("w-0", 1, 0, lease.shard.index, 4) == 0
    assert ledger.progress("w-0", 1, 0, lease.shard.index, 10) == 6
    assert lease.offset == 10


def test_progress_offset_must_not_go_backwards():
    ledger = ShardLedger(30, 3, epochs=1)
    ledger.lease("w-0", 1)
    ledger.progress("w-0", 1, 0, 0, 5)
    with pytest.raises(InvalidArgument):
        ledger.progress("w-0", 1, 0, 0, 4)
    assert ledger.lease_of("w-0").offset == 5


def test_progress_offset_must_not_pass_the_end_of_the_shard():
    ledger = ShardLedger(30, 3, epochs=1)
    ledger.lease("w-0", 1)
    with pytest.raises(InvalidArgument):
        ledger.progress("w-0", 1, 0, 0, 11)
    assert ledger.progress("w-0", 1, 0, 0, 10) == 10


def test_complete_returns_the_samples_not_yet_reported():
    ledger = ShardLedger(30, 3, epochs=1)
    ledger.lease("w-0", 1)
    ledger.progress("w-0", 1, 0, 0, 3)
    assert ledger.complete("w-0", 1, 0, 0) == (7, False)
    assert (ledger.done_in_epoch, ledger.leased, ledger.pending) == (1, 0, 2)
    assert ledger.lease_of("w-0") is None


def test_each_shard_is_counted_once_and_a_second_completion_is_rejected_and_counted():
    ledger = ShardLedger(30, 3, epochs=2)
    ledger.lease("w-0", 1)
    ledger.complete("w-0", 1, 0, 0)
    with pytest.raises(DuplicateCompletion):
        ledger.complete("w-0", 1, 0, 0)
    assert ledger.duplicates_rejected == 1
    assert len(ledger.completions) == 1
    assert ledger.done_in_epoch == 1


def test_a_completion_of_a_done_shard_from_a_member_that_never_held_it_is_not_a_duplicate():
    ledger = ShardLedger(30, 3, epochs=2)
    ledger.lease("w-0", 1)
    ledger.complete("w-0", 1, 0, 0)
    before = ledger.to_state()
    with pytest.raises(FailedPrecondition, match="does not hold shard 0") as raised:
        ledger.complete("w-9", 4, 0, 0)
    assert not isinstance(raised.value, DuplicateCompletion)
    with pytest.raises(FailedPrecondition, match="does not hold shard 0"):
        ledger.progress("w-9", 4, 0, 0, 5)
    assert ledger.to_state() == before and ledger.duplicates_rejected == 0


def test_the_holders_of_a_done_shard_survive_a_restore():
    ledger = ShardLedger(30, 3, epochs=2)
    ledger.lease("w-0", 1)
    ledger.complete("w-0", 1, 0, 0)
    restored = ShardLedger(30, 3, epochs=2)
    restored.restore(ledger.to_state(), list(ledger.completions))
    with pytest.raises(DuplicateCompletion):
        restored.complete("w-0", 1, 0, 0)
    with pytest.raises(FailedPrecondition, match="does not hold"):
        restored.complete("w-1", 1, 0, 0)
    assert restored.duplicates_rejected == 1


def test_a_lease_id_never_issued_is_unknown_not_revoked():
    ledger = ShardLedger(30, 3, epochs=2)
    lease = ledger.lease("w-0", 1)
    with pytest.raises(NotFound, match="lease 99 is unknown: no such lease was ever issued"):
        ledger.progress("w-0", 1, 0, lease.shard.index, 3, lease_id=99)
    ledger.lease("w-1", 1)  # lease 2
    with pytest.raises(FailedPrecondition, match="lease 2 of shard 0 was revoked"):
        ledger.progress("w-0", 1, 0, lease.shard.index, 3, lease_id=2)


def test_a_completion_for_a_previous_epoch_is_a_duplicate():
    ledger = ShardLedger(20, 2, epochs=3)
    finish_epoch(ledger)
    assert ledger.epoch == 1
    with pytest.raises(DuplicateCompletion):
        ledger.complete("w-0", 1, 0, 1)
    assert ledger.duplicates_rejected == 1
    assert len(ledger.completions) == 2


def test_progress_on_a_completed_shard_is_a_failed_precondition():
    ledger = ShardLedger(20, 2, epochs=2)
    ledger.lease("w-0", 1)
    ledger.complete("w-0", 1, 0, 0)
    with pytest.raises(FailedPrecondition):
        ledger.progress("w-0", 1, 0, 0, 1)


def test_completing_the_last_shard_ends_the_epoch_and_refills_the_queue():
    ledger = ShardLedger(20, 2, epochs=2)
    ledger.lease("w-0", 1)
    ledger.lease("w-1", 1)
    assert ledger.complete("w-1", 1, 0, 1) == (10, False)
    assert ledger.complete("w-0", 1, 0, 0) == (10, True)
    assert ledger.epoch == 1 and not ledger.finished
    assert (ledger.pending, ledger.leased, ledger.done_in_epoch) == (2, 0, 0)
    lease = ledger.lease("w-0", 1)
    assert (lease.epoch, lease.shard.index, lease.offset) == (1, 0, 0)


def test_the_ledger_is_finished_after_the_last_epoch_and_leases_nothing():
    ledger = ShardLedger(20, 2, epochs=2)
    finish_epoch(ledger)
    assert not ledger.finished
    finish_epoch(ledger)
    assert ledger.finished and ledger.epoch == 2
    assert ledger.lease("w-0", 1) is None
    assert ledger.pending == 0
    assert [(c.epoch, c.shard) for c in ledger.completions] == [(0, 0), (0, 1), (1, 0), (1, 1)]


# --- ownership ---------------------------------------------------------------------------------


def test_another_member_cannot_progress_or_complete_a_lease_it_does_not_hold():
    ledger = ShardLedger(30, 3, epochs=1)
    ledger.lease("w-0", 1)
    with pytest.raises(FailedPrecondition):
        ledger.progress("w-1", 1, 0, 0, 2)
    with pytest.raises(FailedPrecondition):
        ledger.complete("w-1", 1, 0, 0)
    assert ledger.lease_of("w-0").offset == 0
    assert ledger.done_in_epoch == 0 and ledger.completions == []


def test_an_older_incarnation_cannot_progress_or_complete_the_lease():
    ledger = ShardLedger(30, 3, epochs=1)
    ledger.lease("w-0", 2)
    with pytest.raises(FailedPrecondition):
        ledger.progress("w-0", 1, 0, 0, 2)
    with pytest.raises(FailedPrecondition):
        ledger.complete("w-0", 1, 0, 0)
    assert ledger.done_in_epoch == 0


def test_completing_an_unleased_shard_is_a_failed_precondition():
    ledger = ShardLedger(30, 3, epochs=1)
    with pytest.raises(FailedPrecondition):
        ledger.complete("w-0", 1, 0, 2)
    assert ledger.duplicates_rejected == 0


@pytest.mark.parametrize("epoch,shard", [(0, 3), (0, -1), (1, 0)])
def test_unknown_shards_and_epochs_are_not_found(epoch, shard):
    ledger = ShardLedger(30, 3, epochs=2)
    ledger.lease("w-0", 1)
    with pytest.raises(NotFound):
        ledger.progress("w-0", 1, epoch, shard, 1)
    with pytest.raises(NotFound):
        ledger.complete("w-0", 1, epoch, shard)


@pytest.mark.parametrize("epoch,shard", [(-1, 0), (0, 7)])
def test_complete_reports_a_negative_epoch_or_unknown_shard_of_a_past_epoch_as_not_found(epoch, shard):
    ledger = ShardLedger(20, 2, epochs=2)
    finish_epoch(ledger)
    with pytest.raises(NotFound):
        ledger.complete("w-0", 1, epoch, shard)
    assert ledger.duplicates_rejected == 0


@pytest.mark.parametrize("epoch,shard", [(-1, 0), (0, 7)])
def test_progress_reports_a_negative_epoch_or_unknown_shard_of_a_past_epoch_as_not_found(epoch, shard):
    ledger = ShardLedger(20, 2, epochs=2)
    finish_epoch(ledger)
    with pytest.raises(NotFound):
        ledger.progress("w-0", 1, epoch, shard, 1)


# --- requeue -----------------------------------------------------------------------------------


def test_requeue_puts_the_lease_back_at_the_front_at_its_last_reported_offset():
    ledger = ShardLedger(30, 3, epochs=1)
    ledger.lease("w-0", 1)
    ledger.progress("w-0", 1, 0, 0, 6)
    moved = ledger.requeue("w-0")
    assert [(m.shard.index, m.offset, m.member_id) for m in moved] == [(0, 6, "w-0")]
    assert ledger.reassignments == 1
    assert (ledger.pending, ledger.leased) == (3, 0)
    again = ledger.lease("w-1", 1)
    assert (again.shard.index, again.offset, again.member_id) == (0, 6, "w-1")
    assert ledger.complete("w-1", 1, 0, 0) == (4, False)


def test_the_requeued_member_can_no_longer_report_on_the_shard():
    ledger = ShardLedger(30, 3, epochs=1)
    ledger.lease("w-0", 1)
    ledger.requeue("w-0")
    ledger.lease("w-1", 1)
    with pytest.raises(FailedPrecondition):
        ledger.progress("w-0", 1, 0, 0, 1)
    with pytest.raises(FailedPrecondition):
        ledger.complete("w-0", 1, 0, 0)


def test_requeue_of_a_member_without_a_lease_moves_nothing():
    ledger = ShardLedger(30, 3, epochs=1)
    ledger.lease("w-0", 1)
    assert ledger.requeue("w-1") == []
    assert ledger.reassignments == 0
    assert ledger.lease_of("w-0") is not None


def test_requeued_shard_goes_before_shards_never_leased():
    ledger = ShardLedger(40, 4, epochs=1)
    ledger.lease("w-0", 1)  # shard 0
    ledger.lease("w-1", 1)  # shard 1
    ledger.requeue("w-1")
    assert [ledger.lease(f"w-{i}", 1).shard.index for i in (2, 3, 4)] == [1, 2, 3]
