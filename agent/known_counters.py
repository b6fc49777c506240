"""Each flow's cumulative counters at its last move, kept between reads of the flow table.

Held as numpy arrays sorted by key rather than a dict of bytes keys: at 100,000 flows a
dict held 25 MB (a bytes object, a tuple and three ints per flow), these arrays 6.4 MB
(a 40-byte key and three 8-byte counters), and a lookup of the flows that moved is one
searchsorted for all of them.
"""

from __future__ import annotations

import numpy as np

COLUMNS = 3  # bytes, packets, dropped_packets


def key_strings(keys: np.ndarray) -> np.ndarray:
    """Flow-map keys as fixed-width byte strings: ordered and compared by numpy, bytewise."""
    return np.ascontiguousarray(keys).view(f"S{keys.dtype.itemsize}").ravel()


class KnownCounters:
    def __init__(self) -> None:
        self._keys = np.empty(0, "S1")
        self._counters = np.empty((0, COLUMNS), np.int64)

    def __len__(self) -> int:
        return len(self._keys)

    def reset(self, keys: np.ndarray, counters: np.ndarray) -> None:
        """Know exactly these (keys as key_strings, counters one row per key)."""
        order = np.argsort(keys, kind="stable")
        self._keys, self._counters = keys[order], np.asarray(counters, np.int64)[order]

    def exchange(self, keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
        """Store these keys' counters; returns what was known of them before (0 for new keys).
        Keys are distinct, as one read of a hash map gives them."""
        counters = np.asarray(counters, np.int64)
        if not len(self._keys):
            self._keys = np.empty(0, keys.dtype)
        positions = np.searchsorted(self._keys, keys)
        known = np.zeros(len(keys), bool)
        if len(self._keys):
            inside = positions < len(self._keys)
            known[inside] = self._keys[positions[inside]] == keys[inside]
        previous = np.zeros_like(counters)
        previous[known] = self._counters[positions[known]]
        self._counters[positions[known]] = counters[known]
        new = np.flatnonzero(~known)
        if len(new):
            new = new[np.argsort(keys[new], kind="stable")]  # inserted in order where they fall
            self._keys = np.insert(self._keys, positions[new], keys[new])
            self._counters = np.insert(self._counters, positions[new], counters[new], axis=0)
        return previous

    def keep_only(self, keys: np.ndarray) -> None:
        """Forget every key not among these (the keys the LRU evicted)."""
        present = np.isin(self._keys, keys)
        self._keys, self._counters = self._keys[present], self._counters[present]
