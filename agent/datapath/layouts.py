"""numpy mirrors of the structs the flow and counter reads copy in bulk (bpf/egress_maps.h).

Apart from maps.py so that numpy (50-100 ms to import) loads only in a process that
reads flows or counters: writing policy (egress-block's fast path) needs none of it.
"""

from __future__ import annotations

import numpy as np

from agent.datapath.maps import _IFINDEX_COUNTERS

# Mirrors of struct flow_key / struct flow_stats (bpf/egress_maps.h).
FLOW_KEY_DTYPE = np.dtype(
    [
        ("ifindex", "<u4"),
        ("family", "u1"),
        ("proto", "u1"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("pad", "<u2"),
        ("src_addr", "V16"),
        ("dst_addr", "V16"),
    ]
)
FLOW_STATS_DTYPE = np.dtype(
    [
        ("bytes", "<u8"),
        ("packets", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
        ("dropped_bytes", "<u8"),
        ("dropped_packets", "<u8"),
        ("rule_id", "<u4"),
        ("verdict", "<u4"),
        ("epoch", "<u4"),
        ("pad", "<u4"),
    ]
)

# struct flow_cache_entry: a flow of the per-CPU flow cache (IPv4 only: addresses are 4 bytes)
FLOW_CACHE_ENTRY_DTYPE = np.dtype(
    [
        ("ifindex", "<u4"),
        ("src_addr", "V4"),
        ("dst_addr", "V4"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("proto", "u1"),
        ("pad8", "u1"),
        ("seq", "<u2"),
        ("generation", "<u4"),
        ("epoch", "<u4"),
        ("rule_id", "<u4"),
        ("bytes", "<u8"),
        ("packets", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
    ]
)

# struct veth_counters: a claimant ifindex, then a struct ifindex_counters
VETH_COUNTERS_DTYPE = np.dtype(
    [
        ("ifindex", "<u4"),
        ("cached_generation", "<u4"),
        ("cached_slot", "<u4"),
        ("cached_flags", "<u4"),
        ("cached_rule_kinds", "<u4"),
        ("pad", "<u4"),
        ("counters", "<u8", (_IFINDEX_COUNTERS.size // 8,)),
    ]
)


def distinct_keys(keys: np.ndarray) -> np.ndarray:
    """Flow keys (FLOW_KEY_DTYPE) without repeats, sorted bytewise."""
    return np.unique(keys.view(f"V{keys.dtype.itemsize}")).view(keys.dtype)


# numpy copies, takes, masks and concatenates a structured array field by field, an array
# of opaque byte rows with memcpy: 2,000 flow_stats rows cost 95 us a copy and 130 us a
# take that way, 4 and 8 us as bytes (numpy 2.4). The helpers below move whole records as
# bytes and view the result as records again.


def _as_bytes(records: np.ndarray) -> np.ndarray:
    return records.view(np.dtype((np.void, records.dtype.itemsize)))


def take(records: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """records[rows] (indexes or a mask), copied as bytes."""
    return _as_bytes(records)[rows].view(records.dtype)


def joined(records: list[np.ndarray]) -> np.ndarray:
    """np.concatenate of record arrays of one dtype, copied as bytes."""
    return np.concatenate([_as_bytes(part) for part in records]).view(records[0].dtype)


def copied(records: np.ndarray) -> np.ndarray:
    return _as_bytes(records).copy().view(records.dtype)


def put(into: np.ndarray, records: np.ndarray) -> None:
    """into[:] = records, same dtype, copied as bytes."""
    _as_bytes(into)[...] = _as_bytes(records)
