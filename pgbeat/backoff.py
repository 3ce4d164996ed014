"""The one backoff of every retry in pgbeat: exponential, capped, optionally jittered.

Storage operations (`storage.wrappers.RetryingStorage`), notification deliveries, healthcheck pings and
the pipeline's step retries (in-process and Celery countdowns, `pipeline.runner.backoff_delays`) and the
WAL receiver's restarts of pg_receivewal all wait by `Backoff.delay`, and the loops that call again use
`retry`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """Wait `base * 2**(n - 1)` seconds after the n-th failure, at most `cap`. With `jitter` (a function
    returning a number in [0, 1), such as `random.random`), wait a random part between half and all of it,
    so that many clients failing together do not retry together."""

    base: float = 1.0
    cap: float = 60.0
    jitter: Callable[[], float] | None = None

    def delay(self, failures: int) -> float:
        """Given how many failures there were so far (1 for the first), return the seconds to wait."""
        ceiling = min(self.cap, self.base * 2 ** (failures - 1))
        return ceiling if self.jitter is None else ceiling * (0.5 + self.jitter() / 2)

    def delays(self, retries: int) -> list[float]:
        """Return the waits before each of `retries` retries."""
        return [self.delay(n) for n in range(1, retries + 1)]


def retry(call: Callable[[int], T], *, attempts: int, backoff: Backoff,
          retryable: Callable[[Exception], bool] = lambda exc: True,
          on_retry: Callable[[Exception, int, float], Any] | None = None,
          sleep: Callable[[float], Any] = time.sleep) -> T:
    """Given `call` (passed the attempt number, from 1), return its result, calling it again after an
    exception that is `retryable`, `attempts` tries in all, waiting `backoff.delay(n)` after the n-th
    failure (`on_retry(exc, n, wait)` is told first). Raise the last exception once the attempts are spent,
    and a non-retryable one at once. Raise ValueError if `attempts` is less than 1."""
    if attempts < 1:
        raise ValueError("attempts must be at least 1")
    for attempt in range(1, attempts + 1):
        try:
            return call(attempt)
        except Exception as exc:
            if attempt == attempts or not retryable(exc):
                raise
            wait = backoff.delay(attempt)
            if on_retry is not None:
                on_retry(exc, attempt, wait)
            sleep(wait)
    raise AssertionError("unreachable")
