"""Each flow's cumulative counters at its last move, kept between reads of the flow table.

Held as numpy arrays sorted by key rather than a dict of bytes keys: at 100,000 flows a
dict held 25 MB (a bytes object, a tuple and three ints per flow). A flow key is 44
bytes, but an IPv4 flow's addresses use 4 of their 16 bytes and the pad none: such keys
are kept as the 18 bytes that can differ (4.2 MB at 100,000 flows with the counters,
not 6.8), any other key whole. Which table a key is in depends on its bytes alone, so a
flow always meets its own row. A lookup of the flows that moved is one searchsorted per
table for all of them.
"""

from __future__ import annotations

import numpy as np

from agent.datapath.layouts import FLOW_KEY_DTYPE, take

COLUMNS = 3  # bytes, packets, dropped_packets


def _byte_columns(*spans: tuple[str, int]) -> np.ndarray:
    """Byte offsets in the key of the first `length` bytes of each named field."""
    return np.concatenate([FLOW_KEY_DTYPE.fields[name][1] + np.arange(length) for name, length in spans])


_HEAD = ("ifindex", "family", "proto", "src_port", "dst_port")
_IPV4_ADDRESSES = (("src_addr", 4), ("dst_addr", 4))
_NARROW = _byte_columns(*((name, FLOW_KEY_DTYPE[name].itemsize) for name in _HEAD), *_IPV4_ADDRESSES)
_KEY_BYTES = FLOW_KEY_DTYPE.itemsize
# zero in every key kept narrow: the pad and the addresses' last 12 bytes
_ZERO_WHEN_NARROW = np.setdiff1d(np.arange(_KEY_BYTES), _NARROW)


def rows_of(array: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """array[rows] for rows as flatnonzero gives them (ascending, distinct), without a copy when
    they are all of its rows: on the complete read after 100,000 new flows, each copy was MBs."""
    return array if len(rows) == len(array) else take(array, rows)


class _SortedCounters:
    """Keys (fixed-width byte strings, compared bytewise by numpy) sorted, with their counters."""

    def __init__(self, width: int) -> None:
        self.keys = np.empty(0, f"S{width}")
        self.counters = np.empty((0, COLUMNS), np.int64)

    def reset(self, keys: np.ndarray, counters: np.ndarray) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys, self.counters = keys[order], counters[order]

    def exchange(self, keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
        positions = np.searchsorted(self.keys, keys)
        known = np.zeros(len(keys), bool)
        if len(self.keys):
            inside = positions < len(self.keys)
            known[inside] = self.keys[positions[inside]] == keys[inside]
        previous = np.zeros_like(counters)
        previous[known] = self.counters[positions[known]]
        self.counters[positions[known]] = counters[known]
        new = np.flatnonzero(~known)
        if len(new):
            new = new[np.argsort(keys[new], kind="stable")]  # inserted in order where they fall
            self.keys = np.insert(self.keys, positions[new], keys[new])
            self.counters = np.insert(self.counters, positions[new], counters[new], axis=0)
        return previous

    def keep_only(self, keys: np.ndarray) -> None:
        present = np.isin(self.keys, keys)
        self.keys, self.counters = self.keys[present], self.counters[present]


class KnownCounters:
    def __init__(self) -> None:
        self._narrow = _SortedCounters(len(_NARROW))
        self._wide = _SortedCounters(_KEY_BYTES)

    def __len__(self) -> int:
        return len(self._narrow.keys) + len(self._wide.keys)

    @property
    def nbytes(self) -> int:
        return sum(table.keys.nbytes + table.counters.nbytes for table in (self._narrow, self._wide))

    def reset(self, keys: np.ndarray, counters: np.ndarray) -> None:
        """Know exactly these (FLOW_KEY_DTYPE keys, counters one row per key)."""
        counters = np.asarray(counters, np.int64)
        for table, rows, strings in self._split(keys):
            table.reset(strings, rows_of(counters, rows))

    def exchange(self, keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
        """Store these keys' counters; returns what was known of them before (0 for new keys).
        Keys are distinct, as one read of a hash map gives them."""
        counters = np.asarray(counters, np.int64)
        previous = np.zeros_like(counters)
        if not len(keys):  # an interval with nothing moved: no split to make
            return previous
        for table, rows, strings in self._split(keys):
            previous[rows] = table.exchange(strings, rows_of(counters, rows))
        return previous

    def keep_only(self, keys: np.ndarray) -> None:
        """Forget every key not among these (the keys the LRU evicted)."""
        for table, _, strings in self._split(keys):
            table.keep_only(strings)

    def _split(self, keys: np.ndarray) -> list[tuple[_SortedCounters, np.ndarray, np.ndarray]]:
        """(table, rows of `keys` it holds, those keys as its byte strings) for each table."""
        raw = np.ascontiguousarray(keys, FLOW_KEY_DTYPE).view(np.uint8).reshape(len(keys), _KEY_BYTES)
        narrow = ~raw[:, _ZERO_WHEN_NARROW].any(axis=1)
        narrow_rows, wide_rows = np.flatnonzero(narrow), np.flatnonzero(~narrow)
        return [
            (self._narrow, narrow_rows, _strings(raw[np.ix_(narrow_rows, _NARROW)])),
            (self._wide, wide_rows, _strings(raw[wide_rows])),
        ]


def _strings(raw: np.ndarray) -> np.ndarray:
    """Rows of key bytes as fixed-width byte strings (ordered and compared bytewise)."""
    return np.ascontiguousarray(raw).view(f"S{raw.shape[1]}").ravel()
