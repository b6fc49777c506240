"""Retry at once with backoff, and count: a failed netlink dump or Docker call under
churn ('dump interrupted') is tried again in milliseconds, not at the next reconcile."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class RetryStats:
    """Retries and give-ups since the process started, for `egress-agent status`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.retries = 0
        self.failures = 0
        self.last_failure = ""

    def retry(self, what: str) -> None:
        with self._lock:
            self.retries += 1
        log.debug("%s: retrying", what)

    def fail(self, what: str, why: str) -> None:
        with self._lock:
            self.failures += 1
            self.last_failure = f"{what}: {why}"
        log.warning("%s failed: %s", what, why)


def retried(
    call: Callable[[], T], what: str, stats: RetryStats, attempts: int = 6, first_delay: float = 0.01
) -> T:
    """call(), again after 10, 20, 40 ... ms while it raises; the last error is re-raised."""
    delay = first_delay
    for _ in range(attempts - 1):
        try:
            return call()
        except Exception:
            stats.retry(what)
            time.sleep(delay)
            delay *= 2
    try:
        return call()
    except Exception as exc:
        stats.fail(what, f"{exc} (after {attempts} attempts)")
        raise
