"""pgbeat.backoff: the one backoff every retry in pgbeat waits by."""

from __future__ import annotations

import pytest

from pgbeat.backoff import Backoff, retry


def test_delays_double_from_the_base_up_to_the_cap():
    assert Backoff(base=30, cap=600).delays(7) == [30, 60, 120, 240, 480, 600, 600]
    assert Backoff(base=0, cap=600).delays(3) == [0, 0, 0]


@pytest.mark.parametrize("draw", [0.0, 0.25, 0.999])
def test_jitter_waits_between_half_and_all_of_the_delay(draw):
    wait = Backoff(base=10, cap=100, jitter=lambda: draw).delay(3)
    assert 20 <= wait <= 40 and wait == pytest.approx(40 * (0.5 + draw / 2))


def test_retry_calls_again_after_retryable_failures_and_returns_the_result():
    waits, told, calls = [], [], []

    def flaky(attempt):
        calls.append(attempt)
        if attempt < 3:
            raise ConnectionError(f"down {attempt}")
        return "done"

    result = retry(flaky, attempts=5, backoff=Backoff(base=2, cap=60), sleep=waits.append,
                   on_retry=lambda exc, n, wait: told.append((str(exc), n, wait)))
    assert result == "done" and calls == [1, 2, 3] and waits == [2, 4]
    assert told == [("down 1", 1, 2), ("down 2", 2, 4)]


def test_retry_raises_the_last_failure_once_the_attempts_are_spent():
    waits = []

    def always(attempt):
        raise TimeoutError(f"attempt {attempt}")

    with pytest.raises(TimeoutError, match="attempt 3"):
        retry(always, attempts=3, backoff=Backoff(base=1), sleep=waits.append)
    assert waits == [1, 2]  # no wait after the last attempt


def test_a_permanent_failure_is_raised_at_once():
    waits, calls = [], []

    def refused(attempt):
        calls.append(attempt)
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        retry(refused, attempts=5, backoff=Backoff(), retryable=lambda exc: not isinstance(exc, PermissionError),
              sleep=waits.append)
    assert calls == [1] and waits == []


def test_at_least_one_attempt():
    with pytest.raises(ValueError, match="at least 1"):
        retry(lambda n: n, attempts=0, backoff=Backoff())
