"""The consistency gate and the parameter store, driven directly with explicit ``now`` values."""

from __future__ import annotations

import pytest
import torch

from lepton.errors import ConfigError, DeadlineExceeded, InvalidArgument, NotFound
from lepton.tensors import TensorKind
from ps_server.consistency import consistency_gate
from ps_server.gate import ClockWait, ConsistencyGate, PushOutcome, PushResult
from ps_server.store import ParameterStore

LR = 0.1
TIMEOUT_S = 5.0
T0 = 1000.0


def initial() -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        "b": torch.tensor([0.5, -0.5]),
        "steps": torch.tensor([7], dtype=torch.int64),  # not trainable, still part of a push
    }


def grads(scale: float) -> dict[str, torch.Tensor]:
    return {
        "w": torch.tensor([[1.0, -1.0], [2.0, 0.5]]) * scale,
        "b": torch.tensor([1.0, 3.0]) * scale,
        "steps": torch.tensor([0], dtype=torch.int64),
    }


def make_gate(mode: str, optimizer: str = "sgd", **kwargs) -> ConsistencyGate:
    return consistency_gate(ParameterStore(initial(), optimizer, LR, kwargs), mode, TIMEOUT_S)


def params(gate: ConsistencyGate) -> dict[str, torch.Tensor]:
    return dict(gate.snapshot()[1])


def sgd_reference(steps: list[dict[str, torch.Tensor]], **kwargs) -> dict[str, torch.Tensor]:
    """What torch.optim.SGD does to the trainable tensors given these gradients, step by step."""
    ps = {n: torch.nn.Parameter(t.clone()) for n, t in initial().items() if t.is_floating_point()}
    opt = torch.optim.SGD(list(ps.values()), lr=LR, **kwargs)
    for g in steps:
        for n, p in ps.items():
            p.grad = g[n].clone()
        opt.step()
    return {n: p.detach() for n, p in ps.items()}


def weighted_mean(*pairs: tuple[dict[str, torch.Tensor], int]) -> dict[str, torch.Tensor]:
    total = sum(n for _, n in pairs)
    return {
        name: sum(g[name].to(torch.float64) * n for g, n in pairs).div(total).to(torch.float32)
        for name in ("w", "b")
    }


def assert_params(gate: ConsistencyGate, expected: dict[str, torch.Tensor]) -> None:
    got = params(gate)
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=0, atol=1e-6)
    assert got["steps"].tolist() == [7]


def join_two(gate: ConsistencyGate) -> None:
    """Makes a and b participants: a's first push closes step 0 alone; b's push to step 1 joins."""
    assert gate.push("a", 0, grads(1.0), 1, T0) == 1
    assert gate.version == 1
    assert gate.push("b", 1, grads(2.0), 3, T0) == 2
    assert gate.participants == {"a", "b"}


# --- async -------------------------------------------------------------------------------------


def test_async_push_is_applied_immediately_and_records_staleness():
    gate = make_gate("async")
    first = gate.push("a", 0, grads(1.0), 4, T0)
    assert first == PushResult(PushOutcome.APPLIED, 1, 0)
    second = gate.push("b", 0, grads(2.0), 4, T0)  # computed from version 0, applied at version 1
    assert second == PushResult(PushOutcome.APPLIED, 2, 1)
    third = gate.push("a", 2, grads(0.5), 4, T0)
    assert third == PushResult(PushOutcome.APPLIED, 3, 0)
    c = gate.counters
    assert (c.pushes_received, c.updates_applied, c.pushes_stale) == (3, 3, 0)
    assert (c.staleness_max, c.staleness_count, c.staleness_sum) == (1, 3, 1)
    assert c.staleness_mean == pytest.approx(1 / 3)
    assert_params(gate, sgd_reference([grads(1.0), grads(2.0), grads(0.5)]))


def test_async_push_from_a_future_version_is_stale_and_changes_nothing():
    gate = make_gate("async")
    assert gate.push("a", 1, grads(1.0), 1, T0) == PushResult(PushOutcome.STALE, 0)
    assert gate.version == 0 and gate.counters.pushes_stale == 1 and gate.counters.updates_applied == 0
    assert_params(gate, {n: t for n, t in initial().items() if n != "steps"})


def test_async_with_no_pushes_reports_zero_mean_staleness():
    assert make_gate("async").counters.staleness_mean == 0.0


def test_async_tick_does_nothing():
    gate = make_gate("async")
    gate.push("a", 0, grads(1.0), 1, T0)
    assert gate.tick(T0 + 100 * TIMEOUT_S) is False
    assert gate.counters.steps_timed_out == 0 and gate.version == 1


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError):
        make_gate("eventual")


# --- sync --------------------------------------------------------------------------------------


def test_sync_first_push_with_no_other_participant_closes_the_step_at_once():
    gate = make_gate("sync")
    assert gate.push("a", 0, grads(1.0), 2, T0) == 1
    assert gate.version == 1
    assert gate.wait_for_version(1, 0.0) == PushResult(PushOutcome.APPLIED, 1)
    assert_params(gate, sgd_reference([grads(1.0)]))


def test_sync_step_closes_only_when_every_participant_pushed_with_the_sample_weighted_mean():
    gate = make_gate("sync")
    join_two(gate)
    after_step0 = params(gate)
    assert gate.version == 1  # b's push alone does not close step 1
    assert_params(gate, {n: after_step0[n] for n in ("w", "b")})
    with pytest.raises(DeadlineExceeded):
        gate.wait_for_version(2, 0.0)

    assert gate.push("a", 1, grads(-1.0), 1, T0 + 1) == 2
    assert gate.version == 2
    assert gate.wait_for_version(2, 0.0) == PushResult(PushOutcome.APPLIED, 2)
    mean = weighted_mean((grads(2.0), 3), (grads(-1.0), 1))  # (2*3 - 1*1) / 4 = 1.25 x
    torch.testing.assert_close(mean["b"], torch.tensor([1.25, 3.75]))
    assert_params(gate, sgd_reference([grads(1.0), mean]))
    c = gate.counters
    assert (c.pushes_received, c.updates_applied, c.steps_timed_out, c.pushes_stale) == (3, 2, 0, 0)


def test_sync_weighted_mean_feeds_the_optimizer_state_like_torch_does():
    gate = make_gate("sync", momentum=0.9)
    join_two(gate)
    gate.push("a", 1, grads(-1.0), 1, T0)
    gate.push("b", 2, grads(0.25), 5, T0)
    gate.push("a", 2, grads(4.0), 3, T0)
    assert gate.version == 3
    steps = [grads(1.0), weighted_mean((grads(2.0), 3), (grads(-1.0), 1)),
             weighted_mean((grads(0.25), 5), (grads(4.0), 3))]
    assert_params(gate, sgd_reference(steps, momentum=0.9))


def test_sync_push_from_an_old_version_is_stale_and_changes_nothing():
    gate = make_gate("sync")
    join_two(gate)
    before = params(gate)
    result = gate.push("a", 0, grads(100.0), 1, T0)
    assert result == PushResult(PushOutcome.STALE, 1)
    assert gate.counters.pushes_stale == 1
    assert gate.version == 1
    # the stale push neither contributed nor closed the step: a's real push is still awaited
    gate.push("a", 1, grads(-1.0), 1, T0)
    assert gate.version == 2
    assert_params(gate, sgd_reference([grads(1.0), weighted_mean((grads(2.0), 3), (grads(-1.0), 1))]))
    assert not torch.equal(params(gate)["w"], before["w"])


def test_sync_push_from_a_future_version_is_stale():
    gate = make_gate("sync")
    assert gate.push("a", 3, grads(1.0), 1, T0) == PushResult(PushOutcome.STALE, 0)
    assert gate.version == 0 and gate.participants == set()


def test_a_participant_re_pushing_the_same_step_is_not_counted_twice():
    gate = make_gate("sync")
    join_two(gate)
    assert gate.push("b", 1, grads(50.0), 7, T0 + 1) == 2  # a retry of b's push: ignored
    assert gate.version == 1
    gate.push("a", 1, grads(-1.0), 1, T0 + 2)
    assert gate.version == 2 and gate.counters.updates_applied == 2
    assert_params(gate, sgd_reference([grads(1.0), weighted_mean((grads(2.0), 3), (grads(-1.0), 1))]))


def test_leave_of_the_missing_participant_closes_the_step():
    gate = make_gate("sync")
    join_two(gate)
    gate.leave("a")
    assert gate.version == 2
    assert gate.participants == {"b"}
    assert gate.wait_for_version(2, 0.0).outcome is PushOutcome.APPLIED
    assert_params(gate, sgd_reference([grads(1.0), grads(2.0)]))
    assert gate.push("b", 2, grads(1.0), 1, T0) == 3 and gate.version == 3  # b alone now


def test_leave_with_no_open_step_applies_nothing():
    gate = make_gate("sync")
    join_two(gate)
    gate.push("a", 1, grads(-1.0), 1, T0)
    gate.leave("b")
    assert gate.version == 2 and gate.counters.updates_applied == 2


def test_retain_live_dropping_a_dead_participant_closes_the_step():
    gate = make_gate("sync")
    join_two(gate)
    gate.retain_live({"b", "c"})
    assert gate.participants == {"b"}
    assert gate.version == 2
    assert_params(gate, sgd_reference([grads(1.0), grads(2.0)]))


def test_retain_live_keeping_everyone_does_not_close_the_step():
    gate = make_gate("sync")
    join_two(gate)
    gate.retain_live({"a", "b"})
    assert gate.version == 1 and gate.participants == {"a", "b"}


def test_tick_before_the_timeout_does_nothing():
    gate = make_gate("sync")
    join_two(gate)
    assert gate.tick(T0 + TIMEOUT_S - 0.001) is False
    assert gate.version == 1 and gate.counters.steps_timed_out == 0
    assert gate.participants == {"a", "b"}


def test_tick_at_the_timeout_closes_the_step_with_what_it_has_and_drops_the_rest():
    gate = make_gate("sync")
    join_two(gate)
    assert gate.tick(T0 + TIMEOUT_S) is True
    assert gate.version == 2 and gate.counters.steps_timed_out == 1
    assert gate.participants == {"b"}
    assert_params(gate, sgd_reference([grads(1.0), grads(2.0)]))
    assert gate.tick(T0 + 10 * TIMEOUT_S) is False  # no step open any more
    assert gate.push("b", 2, grads(1.0), 1, T0 + 11 * TIMEOUT_S) == 3 and gate.version == 3


def test_the_timeout_runs_from_the_first_push_of_the_step():
    gate = make_gate("sync")
    join_two(gate)  # step 1 opened at T0 by b
    gate.push("a", 1, grads(1.0), 1, T0 + 3)  # closes step 1
    assert gate.push("b", 2, grads(1.0), 1, T0 + 4) == 3  # step 2 opens at T0 + 4
    assert gate.tick(T0 + TIMEOUT_S + 1) is False
    assert gate.tick(T0 + 4 + TIMEOUT_S) is True
    assert gate.version == 3


def test_a_dropped_participant_rejoins_by_pushing():
    gate = make_gate("sync")
    join_two(gate)
    gate.tick(T0 + TIMEOUT_S)  # a dropped
    assert gate.push("a", 2, grads(1.0), 1, T0 + 6) == 3
    assert gate.participants == {"a", "b"}
    assert gate.version == 2  # now waits for b
    gate.push("b", 2, grads(1.0), 1, T0 + 6)
    assert gate.version == 3


def test_sync_mean_is_cast_back_to_the_parameter_dtype():
    store = ParameterStore({"h": torch.ones(3, dtype=torch.float16)}, "sgd", 1.0, {})
    gate = consistency_gate(store, "sync", TIMEOUT_S)
    gate.push("a", 0, {"h": torch.full((3,), 0.5, dtype=torch.float16)}, 1, T0)
    h = dict(gate.snapshot()[1])["h"]
    assert h.dtype == torch.float16 and h.tolist() == [0.5, 0.5, 0.5]


# --- ssp ---------------------------------------------------------------------------------------


def make_ssp(staleness: int) -> ConsistencyGate:
    return consistency_gate(ParameterStore(initial(), "sgd", LR, {}), "ssp", TIMEOUT_S, staleness=staleness)


def blocked(gate: ConsistencyGate, wait: ClockWait) -> bool:
    """Whether the caller of this push would still be waiting (checked without waiting)."""
    if gate.may_proceed(wait):
        assert gate.wait_for_clock(wait, 0.0) == wait.result
        return False
    with pytest.raises(DeadlineExceeded):
        gate.wait_for_clock(wait, 0.0)
    return True


def test_ssp_push_is_applied_on_arrival_and_records_staleness():
    gate = make_ssp(staleness=3)
    first = gate.push("a", 0, grads(1.0), 4, T0)
    second = gate.push("b", 0, grads(2.0), 4, T0)  # computed from version 0, applied at version 1
    assert isinstance(first, ClockWait) and first.result == PushResult(PushOutcome.APPLIED, 1, 0)
    assert second.result == PushResult(PushOutcome.APPLIED, 2, 1)
    assert gate.version == 2 and gate.counters.updates_applied == 2
    assert gate.counters.staleness_max == 1
    assert_params(gate, sgd_reference([grads(1.0), grads(2.0)]))


def test_ssp_a_newcomer_joins_at_the_clock_of_the_slowest_so_its_push_counts_for_the_next_round():
    gate = make_ssp(staleness=0)
    gate.push("a", 0, grads(1.0), 1, T0)  # a alone: round 1
    b = gate.push("b", 1, grads(1.0), 1, T0)
    assert gate.clocks == {"a": 1, "b": 2} and blocked(gate, b)
    c = gate.push("c", 2, grads(1.0), 1, T0)
    assert gate.clocks == {"a": 1, "b": 2, "c": 2} and blocked(gate, c)
    gate.push("a", 3, grads(1.0), 1, T0)  # a completes round 2: everyone may go on
    assert not blocked(gate, b) and not blocked(gate, c)


def test_ssp_push_from_a_future_version_is_stale_and_does_not_advance_the_clock():
    gate = make_ssp(staleness=1)
    assert gate.push("a", 5, grads(1.0), 1, T0) == PushResult(PushOutcome.STALE, 0)
    assert gate.clocks == {} and gate.version == 0


def test_ssp_a_worker_more_than_s_pushes_ahead_of_the_slowest_waits_until_it_catches_up():
    gate = make_ssp(staleness=2)
    gate.push("b", 0, grads(1.0), 1, T0)  # b joins at clock 1
    waits = [gate.push("a", v, grads(1.0), 1, T0) for v in range(1, 4)]  # a joins at 1, reaches 4
    assert gate.clocks == {"a": 4, "b": 1}
    assert [blocked(gate, w) for w in waits] == [False, False, True]  # clocks 2, 3 within 1 + 2; 4 not
    assert gate.version == 4  # applied on arrival all the same
    assert gate.counters.clock_gap_max == 3
    # a computed its third push at clock 3, two ahead of b: the lead the bound allows, no more
    # (the test sends it without waiting; a real worker waits after the push that reached 4)
    assert gate.counters.compute_gap_max == 2
    gate.push("b", 4, grads(1.0), 1, T0)
    assert not blocked(gate, waits[2])


def test_ssp_with_zero_staleness_moves_in_lockstep():
    gate = make_ssp(staleness=0)
    gate.push("a", 0, grads(1.0), 1, T0)  # a alone: round 1, as the first push of a sync job
    for round_ in range(2, 5):
        base = gate.version
        first = gate.push("b", base, grads(2.0), 1, T0)
        assert blocked(gate, first)  # b's answer waits for a's push of the same round
        second = gate.push("a", base, grads(1.0), 1, T0)
        assert not blocked(gate, second) and not blocked(gate, first)
        # what either pulls now holds both pushes of the round
        assert gate.version == base + 2 and gate.clocks == {"a": round_, "b": round_}
    assert gate.counters.clock_gap_max == 1
    assert gate.counters.compute_gap_max == 0  # lockstep: nobody computes ahead


def test_ssp_a_worker_that_leaves_no_longer_holds_the_others_back():
    gate = make_ssp(staleness=1)
    gate.push("slow", 0, grads(1.0), 1, T0)
    gate.push("fast", 1, grads(1.0), 1, T0)
    waiting = gate.push("fast", 2, grads(1.0), 1, T0)
    assert gate.clocks == {"slow": 1, "fast": 3} and blocked(gate, waiting)
    gate.leave("slow")
    assert gate.participants == {"fast"} and not blocked(gate, waiting)
    gate.push("slow", 3, grads(1.0), 1, T0)  # back again: from fast's clock, not its old one
    assert gate.clocks == {"slow": 4, "fast": 3}


def test_ssp_retain_live_dropping_the_slowest_releases_the_waiters():
    gate = make_ssp(staleness=0)
    gate.push("a", 0, grads(1.0), 1, T0)
    b = gate.push("b", 1, grads(1.0), 1, T0)
    c = gate.push("c", 2, grads(1.0), 1, T0)
    assert blocked(gate, b) and blocked(gate, c)
    gate.retain_live({"b", "c", "d"})
    assert gate.participants == {"b", "c"} and not blocked(gate, b) and not blocked(gate, c)


def test_ssp_retain_live_keeping_everyone_still_holds_the_bound():
    gate = make_ssp(staleness=0)
    gate.push("a", 0, grads(1.0), 1, T0)
    b = gate.push("b", 1, grads(1.0), 1, T0)
    gate.retain_live({"a", "b"})
    assert gate.participants == {"a", "b"} and blocked(gate, b)


def test_ssp_tick_drops_a_silent_laggard_only_after_the_timeout():
    gate = make_ssp(staleness=0)
    gate.push("a", 0, grads(1.0), 1, T0)
    waiting = gate.push("b", 1, grads(1.0), 1, T0 + 1)
    assert blocked(gate, waiting)
    assert gate.tick(T0 + TIMEOUT_S - 0.001) is False and blocked(gate, waiting)
    assert gate.tick(T0 + TIMEOUT_S) is True
    assert gate.participants == {"b"} and not blocked(gate, waiting)
    assert gate.counters.steps_timed_out == 1
    assert gate.tick(T0 + 10 * TIMEOUT_S) is False  # b alone holds nobody back


def test_ssp_tick_keeps_a_slow_worker_that_holds_nobody_back():
    gate = make_ssp(staleness=2)
    gate.push("a", 0, grads(1.0), 1, T0)
    gate.push("b", 1, grads(1.0), 1, T0)
    gate.push("b", 2, grads(1.0), 1, T0)  # b two ahead of a: within the bound
    assert gate.clocks == {"a": 1, "b": 3}
    assert gate.tick(T0 + 100 * TIMEOUT_S) is False and gate.participants == {"a", "b"}


def test_ssp_a_retried_push_is_applied_once_and_waits_again():
    gate = make_ssp(staleness=0)
    gate.push("a", 0, grads(1.0), 1, T0)
    first = gate.push("b", 1, grads(1.0), 1, T0, request_id="r1")
    again = gate.push("b", 1, grads(1.0), 1, T0, request_id="r1")  # the answer to the first was lost
    assert again == first and blocked(gate, again)
    assert gate.version == 2 and gate.clocks == {"a": 1, "b": 2}
    assert gate.counters.pushes_deduplicated == 1
    gate.push("a", 2, grads(1.0), 1, T0)
    assert gate.push("b", 1, grads(1.0), 1, T0, request_id="r1") == first and not blocked(gate, first)
    assert gate.version == 3 and gate.clocks == {"a": 2, "b": 2}


def test_a_negative_staleness_is_refused():
    with pytest.raises(ValueError):
        make_ssp(staleness=-1)


# --- the store ---------------------------------------------------------------------------------


def make_store() -> ParameterStore:
    return ParameterStore(initial(), "sgd", LR, {})


@pytest.mark.parametrize(
    "change,message",
    [
        (lambda g: g.update(extra=torch.zeros(1)), "unexpected"),
        (lambda g: g.update(w=torch.zeros(4)), "expected"),
        (lambda g: g.update(w=torch.zeros(2, 2, dtype=torch.float64)), "expected"),
        (lambda g: g.update(steps=torch.zeros(1, dtype=torch.int32)), "expected"),
        (lambda g: g.update(b=torch.tensor([float("nan"), 0.0])), "NaN or Inf"),
        (lambda g: g.update(b=torch.tensor([0.0, float("inf")])), "NaN or Inf"),
        (lambda g: g.update(w=torch.tensor([[0.0, float("-inf")], [0.0, 0.0]])), "NaN or Inf"),
    ],
    ids=["extra", "shape", "dtype", "int-dtype", "nan", "inf", "neg-inf"],
)
def test_check_gradients_rejects_a_bad_push_and_leaves_parameters_unchanged(change, message):
    store = make_store()
    before = dict(store.snapshot())
    bad = grads(1.0)
    change(bad)
    with pytest.raises(InvalidArgument, match=message):
        store.check_gradients(bad)
    assert store.version == 0
    for name, value in store.snapshot():
        assert torch.equal(value, before[name])


def test_check_gradients_accepts_an_exact_finite_push():
    make_store().check_gradients(grads(1.0))


def test_a_parameter_absent_from_a_push_is_skipped_by_the_optimizer_as_torch_skips_grad_none():
    store = ParameterStore(initial(), "adamw", LR, {"weight_decay": 0.1})
    w = torch.nn.Parameter(initial()["w"].clone())
    b = torch.nn.Parameter(initial()["b"].clone())
    reference = torch.optim.AdamW([w, b], lr=LR, weight_decay=0.1)
    for scale in (1.0, -2.0):
        only_w = {"w": grads(scale)["w"]}
        store.check_gradients(only_w)
        store.apply(only_w)
        w.grad, b.grad = grads(scale)["w"], None
        reference.step()
    got = dict(store.snapshot())
    torch.testing.assert_close(got["w"], w.detach(), rtol=1e-6, atol=1e-7)
    assert torch.equal(got["b"], initial()["b"])  # no decay, no moments: untouched
    assert store.version == 2


def test_a_frozen_tensor_is_never_updated_and_a_push_of_it_is_refused():
    store = ParameterStore(initial(), "adamw", LR, {"weight_decay": 0.5}, kinds={"b": TensorKind.FROZEN})
    with pytest.raises(InvalidArgument, match="frozen"):
        store.check_gradients(grads(1.0))
    assert store.version == 0
    store.apply({"w": grads(1.0)["w"]})
    assert torch.equal(dict(store.snapshot())["b"], initial()["b"])


def test_a_buffer_moves_by_the_pushed_change_in_async_and_by_the_weighted_mean_in_sync():
    kinds = {"steps": TensorKind.BUFFER}
    gate = consistency_gate(ParameterStore(initial(), "sgd", LR, {}, kinds=kinds), "async", TIMEOUT_S)
    gate.push("w-1", 0, {"steps": torch.tensor([1])}, samples=4, now=T0)
    gate.push("w-2", 0, {"steps": torch.tensor([1])}, samples=4, now=T0)
    assert params(gate)["steps"].tolist() == [9]  # every worker's batch counted
    store = ParameterStore(initial(), "sgd", LR, {}, kinds=kinds)
    sync = consistency_gate(store, "sync", TIMEOUT_S)
    sync.join("w-1", 0, 1.0)
    sync.join("w-2", 0, 1.0)
    sync.push("w-1", 0, {"steps": torch.tensor([1]), "b": torch.tensor([1.0, 1.0])}, samples=3, now=T0)
    sync.push("w-2", 0, {"steps": torch.tensor([1])}, samples=1, now=T0)
    assert sync.version == 1
    got = params(sync)
    assert got["steps"].tolist() == [8]  # the mean change of one batch each, rounded, not truncated
    # b's gradient is the sample-weighted mean over both workers, with w-2's absent one as zero
    torch.testing.assert_close(got["b"], initial()["b"] - LR * torch.tensor([0.75, 0.75]))
    torch.testing.assert_close(got["w"], initial()["w"])  # nobody had a gradient for w


def test_apply_steps_the_optimizer_and_bumps_the_version():
    store = make_store()
    assert store.apply(grads(1.0)) == 1 and store.version == 1
    got = dict(store.snapshot())
    expected = sgd_reference([grads(1.0)])
    torch.testing.assert_close(got["w"], expected["w"])
    assert got["steps"].tolist() == [7]


def test_snapshot_returns_copies_in_the_requested_order():
    store = make_store()
    snap = store.snapshot(["b", "w"])
    assert [n for n, _ in snap] == ["b", "w"]
    snap[0][1].add_(100)
    assert dict(store.snapshot())["b"].tolist() == [0.5, -0.5]
    assert [n for n, _ in store.snapshot([])] == ["w", "b", "steps"]


def test_snapshot_of_an_unknown_tensor_is_not_found():
    with pytest.raises(NotFound):
        make_store().snapshot(["w", "nope"])


def test_the_store_owns_copies_of_the_initial_tensors():
    values = initial()
    store = ParameterStore(values, "sgd", LR, {})
    values["w"].add_(1)
    assert dict(store.snapshot())["w"].tolist() == [[1.0, 2.0], [3.0, 4.0]]


def test_an_unknown_optimizer_is_a_config_error():
    with pytest.raises(ConfigError):
        ParameterStore(initial(), "nosuchopt", LR, {})


# --- idempotent pushes ---------------------------------------------------------------------------


def test_a_retried_async_push_with_the_same_request_id_is_applied_once_and_answered_again():
    store = ParameterStore({"w": torch.zeros(2)}, "sgd", 1.0, {})
    gate = consistency_gate(store, "async", step_timeout_s=5.0)
    first = gate.push("w-0", 0, {"w": torch.ones(2)}, 1, 0.0, request_id="r1")
    again = gate.push("w-0", 0, {"w": torch.ones(2)}, 1, 0.0, request_id="r1")
    assert first == again and first.version == 1
    assert store.version == 1 and torch.equal(dict(store.snapshot())["w"], -torch.ones(2))
    assert gate.counters.pushes_deduplicated == 1
    other = gate.push("w-1", 0, {"w": torch.ones(2)}, 1, 0.0, request_id="r1")  # same id, other member
    assert other.version == 2


def test_a_retried_sync_push_after_its_step_closed_gets_the_original_answer():
    store = ParameterStore({"w": torch.zeros(2)}, "sgd", 1.0, {})
    gate = consistency_gate(store, "sync", step_timeout_s=5.0)
    target = gate.push("w-0", 0, {"w": torch.ones(2)}, 1, 0.0, request_id="r1")
    first = gate.wait_for_version(target, 0.0, "w-0", "r1")
    retry = gate.push("w-0", 0, {"w": torch.ones(2)}, 1, 0.0, request_id="r1")
    assert retry == first and store.version == 1


# --- JoinSteps: the same first step on every server ------------------------------------------


def test_a_join_at_the_current_version_makes_the_open_step_wait_for_the_joiner():
    g = make_gate("sync")
    assert g.push("w-1", 0, grads(1.0), 4, T0) == 1  # step 0 open, w-1 the only participant so far
    # ... but w-1's push closed it already (it was the only participant): version 1
    assert g.version == 1
    assert g.join("w-2", 1, timeout_s=0) == (True, 1)
    assert g.participants == {"w-1", "w-2"}
    assert g.push("w-1", 1, grads(1.0), 4, T0) == 2
    assert g.version == 1  # waits for the joiner
    g.push("w-2", 1, grads(3.0), 4, T0)
    assert g.version == 2


def test_a_server_already_past_the_version_refuses_and_changes_nothing():
    g = make_gate("sync")
    g.push("w-1", 0, grads(1.0), 4, T0)
    assert g.join("w-2", 0, timeout_s=0) == (False, 1)
    assert g.participants == {"w-1"}


def test_a_join_ahead_takes_effect_when_the_step_before_closes_and_leave_cancels_it():
    g = make_gate("sync")
    g.join("w-1", 0, timeout_s=0)
    g.join("w-2", 0, timeout_s=0)
    with pytest.raises(DeadlineExceeded):
        g.join("w-3", 1, timeout_s=0)  # step 0 still open: the join stands, the answer times out
    g.push("w-1", 0, grads(1.0), 4, T0)
    assert "w-3" not in g.participants  # step 0 does not wait for it
    g.push("w-2", 0, grads(1.0), 4, T0)
    assert g.version == 1 and g.participants == {"w-1", "w-2", "w-3"}
    assert g.join("w-3", 1, timeout_s=0) == (True, 1)  # already in
    with pytest.raises(DeadlineExceeded):
        g.join("w-4", 2, timeout_s=0)
    g.leave("w-4")
    g.push("w-1", 1, grads(1.0), 4, T0)
    g.push("w-2", 1, grads(1.0), 4, T0)
    g.push("w-3", 1, grads(1.0), 4, T0)
    assert g.version == 2 and "w-4" not in g.participants


def test_two_servers_one_step_apart_take_the_joiner_into_the_same_step():
    """The race a join by pushing loses: server A has closed step 0, server B still waits for w-1's
    step-0 push. JoinSteps(1) on both makes step 1 wait for the joiner on both, and step 0 on B
    closes without it, so both apply exactly the same steps."""
    a, b = make_gate("sync"), make_gate("sync")
    for g in (a, b):
        g.join("w-1", 0, timeout_s=0)
    a.push("w-1", 0, grads(1.0), 4, T0)
    assert (a.version, b.version) == (1, 0)
    assert a.join("w-2", 1, timeout_s=0) == (True, 1)
    with pytest.raises(DeadlineExceeded):
        b.join("w-2", 1, timeout_s=0)
    b.push("w-1", 0, grads(1.0), 4, T0)  # step 0 closes on B without the joiner
    assert b.version == 1 and b.participants == a.participants == {"w-1", "w-2"}
    for g in (a, b):
        g.push("w-1", 1, grads(1.0), 4, T0)
        assert g.version == 1
        g.push("w-2", 1, grads(3.0), 2, T0)
    expected = sgd_reference([grads(1.0), weighted_mean((grads(1.0), 4), (grads(3.0), 2))])
    assert_params(a, expected)
    assert_params(b, expected)


def test_an_idle_server_takes_a_joiner_ahead_into_its_open_step_at_once():
    """A server restarted from a checkpoint is behind the others and nobody takes part in its
    steps: nothing would ever move its version to the joiner's target, so it takes it in now."""
    g = make_gate("sync")
    assert g.join("w-1", 5, timeout_s=0) == (True, 0)
    assert g.participants == {"w-1"}
    g.push("w-1", 0, grads(1.0), 4, T0)
    assert g.version == 1


@pytest.mark.parametrize("gone", ["leave", "declared-dead"])
def test_joiners_left_waiting_by_the_last_participant_are_taken_in_together(gone):
    g = make_gate("sync")
    g.join("w-1", 0, timeout_s=0)
    for member in ("w-2", "w-3"):
        with pytest.raises(DeadlineExceeded):
            g.join(member, 1, timeout_s=0)  # step 0 waits for w-1
    if gone == "leave":
        g.leave("w-1")
    else:
        g.retain_live({"w-2", "w-3"})
    assert g.version == 0 and g.participants == {"w-2", "w-3"}  # nobody left to close step 0
    assert g.join("w-2", 1, timeout_s=0) == (True, 0)  # the repeated call answers at once
    g.push("w-2", 0, grads(1.0), 4, T0)
    assert g.version == 0  # step 0 waits for both joiners: they take part in the same steps
    g.push("w-3", 0, grads(3.0), 4, T0)
    assert g.version == 1


def test_joins_are_no_ops_outside_sync():
    for mode in ("async", "ssp"):
        g = make_gate(mode)
        assert g.join("w-1", 5, timeout_s=0) == (True, 0)
