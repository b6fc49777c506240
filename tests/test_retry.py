"""A failed call is tried again at once, with backoff, and counted (agent/retry.py)."""

from __future__ import annotations

import pytest

from agent.retry import RetryStats, retried


class Flaky:
    """Fails (like a netlink dump interrupted by churn) a given number of times, then answers."""

    def __init__(self, failures: int):
        self.failures = failures
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise OSError(-1, "dump interrupted")
        return "inventory"


def test_a_call_that_recovers_is_retried_and_counted() -> None:
    stats = RetryStats()
    assert retried(Flaky(2), "inventory refresh", stats, first_delay=0.001) == "inventory"
    assert (stats.retries, stats.failures, stats.last_failure) == (2, 0, "")


def test_a_call_that_never_recovers_raises_after_every_attempt_and_counts_a_failure() -> None:
    stats, flaky = RetryStats(), Flaky(10)
    with pytest.raises(OSError, match="dump interrupted"):
        retried(flaky, "inventory refresh", stats, attempts=4, first_delay=0.001)
    assert (flaky.calls, stats.retries, stats.failures) == (4, 3, 1)
    assert stats.last_failure.startswith("inventory refresh: [Errno -1] dump interrupted")
