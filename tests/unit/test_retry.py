"""Retry with jittered exponential backoff, on a fake clock with a fake sleep."""

from __future__ import annotations

import random

import pytest

from lepton.errors import ConfigError, InvalidArgument, Unavailable
from lepton.retry import RetryPolicy, call_with_retry


class FakeTime:
    """``sleep`` advances ``monotonic``; every sleep is recorded."""

    def __init__(self) -> None:
        self.now = 500.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.sleeps.append(seconds)
        self.now += seconds


class Flaky:
    """Raises the given errors in turn, then returns ``value``."""

    def __init__(self, errors: list[BaseException], value: str = "ok") -> None:
        self.errors = list(errors)
        self.value = value
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.value


# --- the policy --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        {"initial_backoff_s": 0.0},
        {"initial_backoff_s": -1.0},
        {"initial_backoff_s": 2.0, "max_backoff_s": 1.0},
        {"max_attempts": 0},
        {"multiplier": 0.5},
    ],
)
def test_an_invalid_policy_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        RetryPolicy(**kwargs)


def test_backoff_is_jittered_within_an_exponential_cap_bounded_by_the_maximum():
    policy = RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0, multiplier=2.0)
    rng = random.Random(7)
    caps = {1: 0.1, 2: 0.2, 3: 0.4, 4: 0.8, 5: 1.0, 6: 1.0, 20: 1.0}
    for attempt, cap in caps.items():
        samples = [policy.backoff_s(attempt, rng) for _ in range(300)]
        assert all(0.0 <= s <= cap for s in samples)
        assert max(samples) > 0.9 * cap  # reaches near the cap ...
        assert min(samples) < 0.1 * cap  # ... and near zero: full jitter
        assert len(set(samples)) > 250  # not a constant


def test_backoff_is_reproducible_with_a_seeded_random():
    policy = RetryPolicy()
    a = [policy.backoff_s(i, random.Random(3)) for i in range(1, 6)]
    b = [policy.backoff_s(i, random.Random(3)) for i in range(1, 6)]
    assert a == b


# --- call_with_retry ---------------------------------------------------------------------------


def test_a_call_that_succeeds_at_once_does_not_sleep():
    t = FakeTime()
    fn = Flaky([])
    result = call_with_retry(fn, RetryPolicy(), sleep=t.sleep, monotonic=t.monotonic, rng=random.Random(0))
    assert result == "ok"
    assert fn.calls == 1 and t.sleeps == []


def test_unavailable_is_retried_until_the_call_succeeds():
    t = FakeTime()
    fn = Flaky([Unavailable("down"), Unavailable("still down")], value="answer")
    seen = []
    result = call_with_retry(
        fn,
        RetryPolicy(initial_backoff_s=0.1, max_backoff_s=1.0),
        sleep=t.sleep,
        monotonic=t.monotonic,
        rng=random.Random(1),
        on_retry=lambda attempt, exc, delay: seen.append((attempt, str(exc), delay)),
    )
    assert result == "answer" and fn.calls == 3
    assert [(a, m) for a, m, _ in seen] == [(1, "down"), (2, "still down")]
    assert [d for _, _, d in seen] == t.sleeps
    assert 0 <= t.sleeps[0] <= 0.1 and 0 <= t.sleeps[1] <= 0.2


def test_retries_stop_after_max_attempts_and_raise_the_last_error():
    t = FakeTime()
    errors = [Unavailable(f"fail {i}") for i in range(10)]
    fn = Flaky(errors)
    with pytest.raises(Unavailable, match="fail 3"):
        call_with_retry(
            fn, RetryPolicy(max_attempts=4, max_total_s=1e9), sleep=t.sleep, monotonic=t.monotonic,
            rng=random.Random(2),
        )
    assert fn.calls == 4 and len(t.sleeps) == 3


def test_max_attempts_of_one_means_no_retry():
    t = FakeTime()
    fn = Flaky([Unavailable("x"), Unavailable("y")])
    with pytest.raises(Unavailable, match="x"):
        call_with_retry(fn, RetryPolicy(max_attempts=1), sleep=t.sleep, monotonic=t.monotonic)
    assert fn.calls == 1 and t.sleeps == []


def test_retries_stop_before_the_total_time_budget_would_be_exceeded():
    t = FakeTime()
    fn = Flaky([Unavailable(str(i)) for i in range(1000)])
    policy = RetryPolicy(initial_backoff_s=1.0, max_backoff_s=1.0, max_attempts=1000, max_total_s=10.0)
    with pytest.raises(Unavailable):
        call_with_retry(fn, policy, sleep=t.sleep, monotonic=t.monotonic, rng=random.Random(4))
    assert sum(t.sleeps) <= 10.0
    assert t.now - 500.0 <= 10.0
    assert fn.calls == len(t.sleeps) + 1
    assert fn.calls > 10  # jittered sleeps average 0.5 s, so well over ten tries fit


def test_time_spent_inside_the_call_counts_against_the_budget():
    t = FakeTime()

    def slow_failure() -> str:
        t.now += 4.0
        raise Unavailable("slow")

    policy = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.01, max_attempts=100, max_total_s=10.0)
    with pytest.raises(Unavailable):
        call_with_retry(slow_failure, policy, sleep=t.sleep, monotonic=t.monotonic, rng=random.Random(5))
    assert len(t.sleeps) == 2  # 4 s, 8 s elapsed; a third try would end past 10 s


def test_errors_not_in_retry_on_are_raised_at_once():
    t = FakeTime()
    fn = Flaky([InvalidArgument("bad"), Unavailable("never reached")])
    with pytest.raises(InvalidArgument):
        call_with_retry(fn, RetryPolicy(), sleep=t.sleep, monotonic=t.monotonic)
    assert fn.calls == 1 and t.sleeps == []


def test_retry_on_can_name_other_errors():
    t = FakeTime()
    fn = Flaky([TimeoutError(), TimeoutError()])
    result = call_with_retry(
        fn, RetryPolicy(), retry_on=(TimeoutError,), sleep=t.sleep, monotonic=t.monotonic
    )
    assert result == "ok"
    assert fn.calls == 3


def test_a_policy_with_many_attempts_keeps_retrying_at_the_maximum_backoff():
    t = FakeTime()
    fn = Flaky([Unavailable(str(i)) for i in range(1500)])
    policy = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.002, max_attempts=2000, max_total_s=1e9)
    assert call_with_retry(fn, policy, sleep=t.sleep, monotonic=t.monotonic, rng=random.Random(6)) == "ok"
    assert fn.calls == 1501 and max(t.sleeps) <= 0.002
