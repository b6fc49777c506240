"""A thread-safe latency histogram in plain data: the loop records, front ends read.

Kept apart from the Prometheus client so the monitor measures without knowing who
exports the numbers (agent/metrics.py turns LatencyCounts into a histogram family).
"""

from __future__ import annotations

import bisect
import threading
from dataclasses import dataclass

# Attaching is a tc change (about a millisecond); the tail is a busy host or a retry.
ATTACH_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


@dataclass(frozen=True)
class LatencyCounts:
    bounds: tuple[float, ...]  # upper bounds in seconds, ascending; +Inf is implied after them
    counts: tuple[int, ...]  # observations per bucket (not cumulative), len(bounds) + 1
    total_seconds: float

    @property
    def observations(self) -> int:
        return sum(self.counts)


class LatencyHistogram:
    def __init__(self, bounds: tuple[float, ...] = ATTACH_LATENCY_BUCKETS):
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)
        self._total = 0.0
        self._lock = threading.Lock()

    def observe(self, seconds: float) -> None:
        with self._lock:
            self._counts[bisect.bisect_left(self._bounds, seconds)] += 1  # a bound is "less or equal"
            self._total += seconds

    def read(self) -> LatencyCounts:
        with self._lock:
            return LatencyCounts(self._bounds, tuple(self._counts), self._total)
