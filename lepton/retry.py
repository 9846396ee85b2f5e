"""Retry with jittered exponential backoff, for idempotent calls that failed with Unavailable."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from lepton.errors import ConfigError, Unavailable

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Full-jitter exponential backoff bounded in attempts and total time."""

    initial_backoff_s: float = 0.05
    max_backoff_s: float = 2.0
    multiplier: float = 2.0
    max_attempts: int = 8
    max_total_s: float = 30.0

    def __post_init__(self) -> None:
        if self.initial_backoff_s <= 0 or self.max_backoff_s < self.initial_backoff_s:
            raise ConfigError("retry backoff bounds must satisfy 0 < initial <= max")
        if self.max_attempts < 1 or self.multiplier < 1:
            raise ConfigError("retry needs max_attempts >= 1 and multiplier >= 1")

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Delay before retry number ``attempt`` (1-based): uniform in [0, cap]."""
        cap = self.initial_backoff_s
        for _ in range(attempt - 1):  # grows until the ceiling, never past it (no overflow)
            if cap >= self.max_backoff_s:
                break
            cap *= self.multiplier
        return rng.uniform(0, min(cap, self.max_backoff_s))


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    retry_on: tuple[type[BaseException], ...] = (Unavailable,),
    sleep: Callable[[float], None] = time.sleep,
    monotonic: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    on_retry: Callable[[int, BaseException, float], None] | None = None,
) -> T:
    """Calls ``fn`` until it succeeds, raises something not in ``retry_on``, or the policy's
    attempts or total time run out (then the last error is raised). An error that names its own
    delay (``retry_after_s``, as errors.NotReady does) is retried after that delay instead of
    the backoff's."""
    rng = rng or random.Random()
    start = monotonic()
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except retry_on as exc:
            delay = policy.backoff_s(attempt, rng)
            named = getattr(exc, "retry_after_s", None)
            if named is not None:
                delay = min(named, policy.max_backoff_s)
            if attempt >= policy.max_attempts or monotonic() - start + delay > policy.max_total_s:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, delay)
            sleep(delay)
