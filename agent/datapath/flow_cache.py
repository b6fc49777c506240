"""The datapath's per-CPU flow cache (struct flow_cache_set, bpf/egress_maps.h), added to
reads of the flow table.

A forwarded IPv4 packet whose flow sits in its CPU's cache is counted there, not in the
flows table, so a flow's counters are its table entry plus what each CPU's cache holds
for it. The datapath moves a cached flow's counts into the table (a write-back) when it
evicts the flow and on the flow's first packet of an epoch, and every write-back, like
every flow taking a way, changes the way's seq.

So a read (Maps.read_flows, Maps.lookup_flows) takes the cache, then the table, then the
cache again (settle). Where no way's seq changed in between, no count moved between the
cache and the table while the table was read, and the first cache read was not torn by a
write-back: a flow's total is its table entry plus that first cache read (it may miss
hits counted since, never count one twice). The flows of ways whose seq did change are
read from the table again, each with the cache read taken just before, until no way
changed between that cache read and the next (only those flows are checked again, so a
read settles while other flows keep moving).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from agent.datapath.layouts import (
    FLOW_CACHE_ENTRY_DTYPE,
    FLOW_KEY_DTYPE,
    FLOW_STATS_DTYPE,
    copied,
    joined,
    take,
)
from agent.datapath.mapped_array import MappedArray
from agent.datapath.percpu import possible_cpus
from agent.datapath.pinned import PinnedMap

# Reads of the table and cache again before a read settles for what it has: each needs a
# write-back to land in the few microseconds between two reads of the cache.
SETTLE_ATTEMPTS = 8
_KEY_BYTES = FLOW_KEY_DTYPE.itemsize
_SRC, _DST = (FLOW_KEY_DTYPE.fields[name][1] for name in ("src_addr", "dst_addr"))

TableLookup = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


class FlowCache:
    """The pinned flow_cache map, read whole: every CPU's every way. A plain array, each
    CPU's sets one after the other (struct flow_cache_set says why), read through its mmap
    (agent/datapath/mapped_array.py): a torn way shows in its seq, as settle() checks."""

    def __init__(self, pinned: PinnedMap) -> None:
        self.sets = pinned.max_entries // possible_cpus()  # one CPU's
        self.ways = pinned.value_size // FLOW_CACHE_ENTRY_DTYPE.itemsize
        self._mapped = MappedArray(pinned, FLOW_CACHE_ENTRY_DTYPE)

    def read(self) -> np.ndarray:
        """Every entry (FLOW_CACHE_ENTRY_DTYPE), in a fixed order: CPU, set, way."""
        return self._mapped.read()

    def close(self) -> None:
        self._mapped.close()


def settle(
    keys: np.ndarray,
    stats: np.ndarray,
    before: np.ndarray,
    cache: FlowCache,
    lookup: TableLookup,
    wanted: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(keys, stats) of a table read taken after the cache read `before`, with the cache's
    counts added: for `wanted` keys only, or every flow either holds when None. `lookup`
    reads the table again for some keys (found keys, their stats).

    A flow's cache counts come from the cache read taken just before its table read, and
    count only if no way changed between that cache read and the next: then no count moved
    between cache and table meanwhile, and the copy was not torn by a write-back."""
    wanted_strings = None if wanted is None else _strings(wanted)
    counted = _occupied(before)  # the entries each flow counts: the cache read before its table read
    unsettled: np.ndarray | None = None  # the flows still to check: all of them at first
    after = cache.read()
    for _ in range(SETTLE_ATTEMPTS):
        moved = (before["seq"] != after["seq"]) | (after["seq"] & 1 == 1)
        if not moved.any():  # most reads: no way changed while the table was read
            break
        again = np.unique(_strings(keys_of(joined([take(before, moved), take(after, moved)]))))
        for among in (unsettled, wanted_strings):
            if among is not None:
                again = again[np.isin(again, among)]
        if not len(again):
            break
        found_keys, found_stats = lookup(again.view(FLOW_KEY_DTYPE))
        kept = ~np.isin(_strings(keys), again)
        keys = joined([take(keys, kept), found_keys])
        stats = joined([take(stats, kept), found_stats])
        newer = _occupied(after)
        counted = joined([_without(counted, again), take(newer, np.isin(_strings(keys_of(newer)), again))])
        unsettled = again  # every other flow's ways held still: settled
        before, after = after, cache.read()
    cached_keys, cached_stats = totals(counted)
    if wanted_strings is not None:  # after totals: fewer rows, one per flow with counts
        keep = np.isin(_strings(cached_keys), wanted_strings)
        cached_keys, cached_stats = take(cached_keys, keep), take(cached_stats, keep)
    return add_cached(keys, stats, cached_keys, cached_stats)


def _occupied(entries: np.ndarray) -> np.ndarray:
    return take(entries, entries["ifindex"] != 0)


def _without(entries: np.ndarray, flows: np.ndarray) -> np.ndarray:
    """The entries of flows (byte-string keys) other than these."""
    return take(entries, ~np.isin(_strings(keys_of(entries)), flows))


def keys_of(entries: np.ndarray) -> np.ndarray:
    """The flow key (FLOW_KEY_DTYPE) of each cache entry: IPv4, as the cache holds only those."""
    keys = np.zeros(len(entries), FLOW_KEY_DTYPE)
    for field in ("ifindex", "proto", "src_port", "dst_port"):
        keys[field] = entries[field]
    keys["family"] = 4
    raw = keys.view(np.uint8).reshape(len(entries), _KEY_BYTES)
    raw[:, _SRC : _SRC + 4] = np.ascontiguousarray(entries["src_addr"]).view(np.uint8).reshape(-1, 4)
    raw[:, _DST : _DST + 4] = np.ascontiguousarray(entries["dst_addr"]).view(np.uint8).reshape(-1, 4)
    return keys


def totals(entries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(keys, stats) of the flows with counts in the cache, one row per flow: its entries
    on every CPU summed, last_seen_ns and rule_id those of the latest."""
    live = take(entries, (entries["ifindex"] != 0) & ((entries["packets"] != 0) | (entries["bytes"] != 0)))
    distinct, first_row, group = np.unique(_strings(keys_of(live)), return_index=True, return_inverse=True)
    stats = np.zeros(len(distinct), FLOW_STATS_DTYPE)
    for counter in ("bytes", "packets"):
        np.add.at(stats[counter], group, live[counter])
    latest = np.lexsort((live["last_seen_ns"], group))  # by flow, then time: a flow's last row is its latest
    ends = np.flatnonzero(np.diff(group[latest], append=-1))  # where the next row is another flow's
    last_of_group = latest[ends]
    stats["last_seen_ns"] = live["last_seen_ns"][last_of_group]
    stats["rule_id"] = live["rule_id"][last_of_group]
    stats["first_seen_ns"] = live["first_seen_ns"][first_row]  # the table entry's: alike on every CPU
    stats["epoch"] = live["epoch"][last_of_group]
    return distinct.view(FLOW_KEY_DTYPE), stats


def add_cached(
    keys: np.ndarray, stats: np.ndarray, cached_keys: np.ndarray, cached_stats: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The table's rows with the cached counts added (the latest packet's fields where the
    cache saw it), and the cached flows the table does not hold (evicted meanwhile) appended."""
    if not len(cached_keys):
        return keys, stats
    table, cached = _strings(keys), _strings(cached_keys)  # cached is sorted (np.unique)
    positions = np.minimum(np.searchsorted(cached, table), len(cached) - 1)
    rows = np.flatnonzero(cached[positions] == table)
    hits = take(cached_stats, positions[rows])
    stats = copied(stats)
    for counter in ("bytes", "packets"):
        stats[counter][rows] += hits[counter]
    newer = rows[hits["last_seen_ns"] >= stats["last_seen_ns"][rows]]
    newest = take(cached_stats, positions[newer])
    stats["last_seen_ns"][newer] = newest["last_seen_ns"]
    stats["rule_id"][newer] = newest["rule_id"]
    stats["verdict"][newer] = 0  # VERDICT_FORWARDED: the cache counts nothing else
    alone = np.ones(len(cached), bool)
    alone[positions[rows]] = False
    return joined([keys, take(cached_keys, alone)]), joined([stats, take(cached_stats, alone)])


def _strings(keys: np.ndarray) -> np.ndarray:
    """Flow keys as fixed-width byte strings: sorted, searched and compared bytewise."""
    return np.ascontiguousarray(keys).view(f"S{_KEY_BYTES}").ravel()
