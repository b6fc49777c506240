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
