"""The pinned maps, read and written by raw bpf syscalls: no BCC, no compile, any process.

Every layout here mirrors a struct in bpf/egress_maps.h.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.datapath.percpu import merge_flow_copies, possible_cpus
from agent.datapath.pinned import PinnedMap
from agent.datapath.policy_maps import U32, PolicyMaps
from agent.datapath.ringbuf import RingBuffer
from agent.datapath.syscalls import BPF_MAP_LOOKUP_ELEM, MapElemAttr, bpf_each, sys_bpf

if TYPE_CHECKING:
    import numpy as np

    from agent.datapath.flow_cache import FlowCache
    from agent.datapath.flow_lookup import FlowLookup

log = logging.getLogger(__name__)

LAYOUT_VERSION = 8  # EGRESS_TOP_LAYOUT in bpf/egress_maps.h
BPFFS = Path("/sys/fs/bpf")
# The datapath stamps flows with CLOCK_MONOTONIC_COARSE (clock id 6 on Linux, not in Python's
# time module), read once per jiffy: behind CLOCK_MONOTONIC by up to the last timekeeping
# update (measured here up to 7.4 ms, under two ticks of 4 ms) plus a tick. A read that
# started at t may miss a packet stamped a little before t, so its started_ns is put four
# ticks earlier.
CLOCK_MONOTONIC_COARSE = 6
COARSE_CLOCK_SLACK_NS = 4 * round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9)
PIN_DIR = BPFFS / "egress-top" / f"v{LAYOUT_VERSION}"
DEFAULT_FLOW_TABLE_SIZE = 65536
POLICY_TABLE_SIZE = 131072
OVERFLOW_FAMILY, OVERFLOW_PROTO = 0, 0xFF  # the flow key of a veth's overflow flow
MAP_PINS = {
    "flows": "PIN_FLOWS",
    "endpoints": "PIN_ENDPOINTS",
    "policy_lpm": "PIN_POLICY",
    "rule_stats": "PIN_RULE_STATS",
    "ifindex_counters": "PIN_IFINDEX_COUNTERS",
    "datapath_stats": "PIN_DATAPATH_STATS",
    "datapath_config": "PIN_DATAPATH_CONFIG",
    "slot_rule_kinds": "PIN_SLOT_RULE_KINDS",
    "veth_counters": "PIN_VETH_COUNTERS",
    "flow_shares": "PIN_FLOW_SHARES",
    "moved_flows": "PIN_MOVED_FLOWS",
    "flow_cache": "PIN_FLOW_CACHE",
}
STAT_FLOWS_CREATED = 0
STAT_MOVED_LOST = 2
MOVED_FLOWS_BYTES = 1 << 22  # the moved_flows ring buffer's data bytes

# struct ifindex_counters: packets and bytes, IfindexCounters' fields, the overflow_* totals
_IFINDEX_COUNTERS = struct.Struct("=14Q")
_COUNTERS_AFTER_TOTALS = slice(2, 12)
VETH_COUNTER_SLOTS = 1024


def __getattr__(name: str) -> object:
    """The numpy layouts (agent/datapath/layouts.py), imported when first asked for: a
    process that only writes policy (egress-block) never loads numpy."""
    if name in ("FLOW_KEY_DTYPE", "FLOW_STATS_DTYPE", "FLOW_CACHE_ENTRY_DTYPE", "VETH_COUNTERS_DTYPE"):
        from agent.datapath import layouts

        return getattr(layouts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class DatapathConfig(ctypes.Structure):
    """struct datapath_config, laid over the mmap of its array: each field is written
    with one aligned 4-byte store, never as a whole value, so writers of different
    fields (the agent's epoch, a sync's flags) cannot undo each other."""

    _fields_ = [
        ("flags", ctypes.c_uint32),
        ("epoch", ctypes.c_uint32),
        ("flow_share", ctypes.c_uint32),
        ("endpoints_generation", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class FlowTableRead:
    """One read of the flow map: parallel arrays, plus when it was taken."""

    keys: np.ndarray  # FLOW_KEY_DTYPE
    stats: np.ndarray  # FLOW_STATS_DTYPE
    monotonic_ns: int  # when the read ended
    started_ns: int  # when it began, less COARSE_CLOCK_SLACK_NS: a flow counted since may or may not be in it


@dataclass(frozen=True)
class IfindexCounters:
    """struct ifindex_counters: one veth's packets that flows show only in part."""

    non_ip_packets: int
    non_ip_bytes: int
    dropped_packets: int  # by a block rule
    dropped_bytes: int
    unparsed_packets: int  # transport header out of reach, passed or dropped
    unparsed_bytes: int
    unparsed_dropped_packets: int  # of those, dropped: the container has rules
    unparsed_dropped_bytes: int
    held_packets: int  # dropped while the veth had no endpoint entry (hold unknown veths)
    held_bytes: int


# field -> column of a struct ifindex_counters read as u64s: the totals, IfindexCounters, the overflow_*
_IFINDEX_COUNTERS_COLUMNS = {
    name: column
    for column, name in enumerate(
        ("packets", "bytes", *IfindexCounters.__dataclass_fields__, "overflow_packets", "overflow_bytes")
    )
}


@dataclass(frozen=True)
class EndpointTotals:
    """One veth's exact egress totals (struct ifindex_counters), whatever the flow table
    evicted: every IPv4/IPv6 packet, in IP bytes, summed over CPUs."""

    packets: int
    bytes: int
    dropped_packets: int  # by a rule, unparsed with rules, or held
    dropped_bytes: int
    overflow_packets: int  # counted in the veth's overflow flow: past its flow share
    overflow_bytes: int


def pins_exist(pin_dir: Path = PIN_DIR) -> bool:
    return all((pin_dir / name).exists() for name in MAP_PINS)


def pinned_flow_table_size(pin_dir: Path = PIN_DIR) -> int | None:
    """Entries of the pinned flow table, or None when none is pinned."""
    if not (pin_dir / "flows").exists():
        return None
    flows = PinnedMap(pin_dir / "flows")
    try:
        return flows.max_entries
    finally:
        flows.close()


class Maps(PolicyMaps):
    """Every pinned map of ours, read and written as bytes laid out as in bpf/egress_maps.h:
    the flow table and the per-veth counters here, endpoints, policy and rule hits in
    PolicyMaps (agent/datapath/policy_maps.py)."""

    def __init__(self, pin_dir: Path = PIN_DIR):
        self.pin_dir = pin_dir
        self.flows = PinnedMap(pin_dir / "flows")
        self.endpoints = PinnedMap(pin_dir / "endpoints")
        self.policy = PinnedMap(pin_dir / "policy_lpm")
        self.slot_rule_kinds = PinnedMap(pin_dir / "slot_rule_kinds")
        self.rule_stats = PinnedMap(pin_dir / "rule_stats")
        self.ifindex_counters = PinnedMap(pin_dir / "ifindex_counters")
        self.veth_counters = PinnedMap(pin_dir / "veth_counters")
        self.flow_shares = PinnedMap(pin_dir / "flow_shares")
        self.datapath_stats = PinnedMap(pin_dir / "datapath_stats")
        self.datapath_config = PinnedMap(pin_dir / "datapath_config")
        self.moved_flows = PinnedMap(pin_dir / "moved_flows")
        self.flow_cache = PinnedMap(pin_dir / "flow_cache")
        self.flow_table_size = self.flows.max_entries
        # flow_stats copies per lookup: 1, the flow table is shared (struct flow_stats)
        self.flow_copies = possible_cpus() if self.flows.percpu else 1
        self._batch_supported = True
        self._flow_lookup_loaded = False
        self._batched_lookup: FlowLookup | None = None
        self._flow_cache: FlowCache | None = None
        self._config_memory = mmap.mmap(
            self.datapath_config.fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._config: DatapathConfig | None = DatapathConfig.from_buffer(self._config_memory)
        self._moved_ring: RingBuffer | None = None  # mapped by the first read_moved_keys
        self._moved_lost_seen = 0

    def close(self) -> None:
        self._config = None  # the mmap cannot close while a view of it lives
        self._config_memory.close()
        if self._moved_ring is not None:
            self._moved_ring.close()
        if self._batched_lookup is not None:
            self._batched_lookup.close()
        for pinned in (
            self.flows,
            self.endpoints,
            self.policy,
            self.slot_rule_kinds,
            self.rule_stats,
            self.ifindex_counters,
            self.veth_counters,
            self.flow_shares,
            self.datapath_stats,
            self.datapath_config,
            self.moved_flows,
            self.flow_cache,
        ):
            pinned.close()

    @property
    def config(self) -> DatapathConfig:
        assert self._config is not None, "Maps used after close()"
        return self._config

    # --- flows ------------------------------------------------------------------------

    def read_flows(self) -> FlowTableRead:
        """The whole flow table, as merged flow_stats values, with the flow cache's counts
        added (agent/datapath/flow_cache.py)."""
        import numpy as np

        from agent.datapath.flow_cache import settle
        from agent.datapath.layouts import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE

        started = _monotonic_ns() - COARSE_CLOCK_SLACK_NS
        cache = self._cache()
        before = cache.read()
        keys = np.empty(self.flow_table_size, FLOW_KEY_DTYPE)
        copies = np.empty((self.flow_table_size, self.flow_copies), FLOW_STATS_DTYPE)
        count = self.flows.lookup_batch(keys, copies) if self._batch_supported else None
        if count is None:
            self._batch_supported = False
            count = self._lookup_one_by_one(keys, copies)
        stats = merge_flow_copies(copies[:count])
        keys, stats = settle(keys[:count], stats, before, cache, self._lookup_table)
        return FlowTableRead(keys, stats, _monotonic_ns(), started)

    def _lookup_one_by_one(self, keys: np.ndarray, copies: np.ndarray) -> int:
        """For kernels without batch lookups (before 5.6)."""
        import numpy as np

        from agent.datapath.layouts import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE

        items = self.flows.items()[: len(keys)]
        for row, (key, value) in enumerate(items):
            keys[row] = np.frombuffer(key, FLOW_KEY_DTYPE)[0]
            copies[row] = np.frombuffer(value, FLOW_STATS_DTYPE)
        return len(items)

    def lookup_flows(self, keys: np.ndarray) -> FlowTableRead:
        """Just these flows (FLOW_KEY_DTYPE keys), as read_flows gives them; keys gone from
        the table and the cache meanwhile are left out."""
        import numpy as np

        from agent.datapath.flow_cache import settle
        from agent.datapath.layouts import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE

        started = _monotonic_ns() - COARSE_CLOCK_SLACK_NS
        wanted = np.ascontiguousarray(keys, FLOW_KEY_DTYPE)
        if not len(wanted):  # nothing moved: nothing to read, in the table or the cache
            return FlowTableRead(wanted, np.empty(0, FLOW_STATS_DTYPE), _monotonic_ns(), started)
        cache = self._cache()
        before = cache.read()
        found, stats = self._lookup_table(wanted)
        found, stats = settle(found, stats, before, cache, self._lookup_table, wanted)
        return FlowTableRead(found, stats, _monotonic_ns(), started)

    def _lookup_table(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(keys found, their merged flow_stats) in the table alone: one syscall per 1,024
        keys (agent/datapath/flow_lookup.py), or one per key where the kernel cannot run
        the lookup program."""
        batched = self._flow_lookup()
        if batched is not None:
            found, stats = batched.lookup(wanted)
        else:
            found, copies = self._lookup_each(wanted)
            stats = merge_flow_copies(copies[found])
        return wanted[found], stats

    def _cache(self) -> FlowCache:
        if self._flow_cache is None:
            from agent.datapath.flow_cache import FlowCache

            self._flow_cache = FlowCache(self.flow_cache)
        return self._flow_cache

    def _flow_lookup(self) -> FlowLookup | None:
        """The batched lookup, loaded by the first call (only a reader of moved flows needs
        it); None on a kernel that cannot run it or a per-CPU table."""
        if not self._flow_lookup_loaded:
            self._flow_lookup_loaded = True
            if self.flow_copies == 1:
                from agent.datapath import flow_lookup
                from agent.datapath.layouts import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE

                self._batched_lookup = flow_lookup.load(self.flows.fd, FLOW_KEY_DTYPE, FLOW_STATS_DTYPE)
        return self._batched_lookup

    def _lookup_each(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, copies): one lookup syscall per key, straight into numpy: the attrs are
        laid out by numpy first, so the loop in Python is the syscalls alone."""
        import numpy as np

        from agent.datapath.layouts import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE

        copies = np.empty((len(wanted), self.flow_copies), FLOW_STATS_DTYPE)
        attrs = np.zeros(len(wanted), np.dtype(MapElemAttr))
        attrs["map_fd"] = self.flows.fd
        rows = np.arange(len(wanted), dtype=np.uint64)
        attrs["key"] = wanted.ctypes.data + rows * np.uint64(FLOW_KEY_DTYPE.itemsize)
        attrs["value"] = copies.ctypes.data + rows * np.uint64(copies.strides[0])
        laid = (ctypes.c_char * attrs.nbytes).from_buffer(attrs)
        found = np.array(bpf_each(BPF_MAP_LOOKUP_ELEM, laid, attrs.itemsize), np.int64) >= 0
        for row in np.flatnonzero(~found).tolist():  # again, for its errno
            try:
                sys_bpf(BPF_MAP_LOOKUP_ELEM, MapElemAttr.from_buffer(laid, row * attrs.itemsize))
                found[row] = True  # created again since the first try: as it is now
            except FileNotFoundError:  # evicted since it moved
                pass
            except OSError as exc:
                raise OSError(exc.errno, f"BPF_MAP_LOOKUP_ELEM on the flow table: {exc.strerror}") from None
        return found, copies

    def bump_epoch(self) -> int:
        """Start a new epoch: from now on each flow's first packet announces its key in
        moved_flows again. Returns the new epoch (never 0: epoch 0 announces nothing)."""
        epoch = (self.config.epoch + 1) & 0xFFFFFFFF or 1
        self.config.epoch = epoch
        return epoch

    def read_moved_keys(self) -> tuple[np.ndarray | None, int]:
        """(keys, lost): the distinct keys (FLOW_KEY_DTYPE) of the flows announced since the
        last call, and how many announcements the full ring buffer lost meanwhile. keys is
        None when any were lost: then only read_flows() tells everything that moved.
        One consumer at a time: the ring buffer has a single consumer position."""
        import numpy as np

        from agent.datapath.layouts import FLOW_KEY_DTYPE, distinct_keys

        if self._moved_ring is None:
            self._moved_ring = RingBuffer(self.moved_flows.fd, self.moved_flows.max_entries)
            self._moved_lost_seen = self._stat(STAT_MOVED_LOST)
        raw = self._moved_ring.drain_fixed(FLOW_KEY_DTYPE.itemsize)
        lost_so_far = self._stat(STAT_MOVED_LOST)  # read after the drain: a loss is never missed
        lost, self._moved_lost_seen = lost_so_far - self._moved_lost_seen, lost_so_far
        if lost:
            return None, lost
        if not len(raw):
            return np.empty(0, FLOW_KEY_DTYPE), 0
        return distinct_keys(np.frombuffer(raw, FLOW_KEY_DTYPE)), 0

    def set_flow_share(self, flows_per_epoch: int) -> None:
        """How many flows one veth may create per epoch before the rest of its new flows
        are counted in its overflow flow; 0 restores the default (flow table size / 8)."""
        self.config.flow_share = flows_per_epoch

    def _stat(self, index: int) -> int:
        per_cpu = self.datapath_stats.lookup(U32.pack(index)) or b""
        return sum(struct.unpack(f"={len(per_cpu) // 8}Q", per_cpu))

    def flows_created(self) -> int:
        return self._stat(STAT_FLOWS_CREATED)

    def moved_lost(self) -> int:
        """Announcements of moved flows lost to a full ring buffer, ever."""
        return self._stat(STAT_MOVED_LOST)

    # --- per-veth counters -------------------------------------------------

    def _ifindex_sums(self) -> tuple[list[int], np.ndarray]:
        """(ifindexes, one row of struct ifindex_counters u64 fields each) per veth: its claimed
        veth_counters copies plus its ifindex_counters entry (bpf/egress_maps.h, struct
        veth_counters), all summed in numpy at once (a mask and objects per veth cost ~10 us
        each at 200 veths, every interval)."""
        import numpy as np

        from agent.datapath.layouts import VETH_COUNTERS_DTYPE

        fields = _IFINDEX_COUNTERS.size // 8
        entries = self.ifindex_counters.items()
        slots = self.veth_counters.max_entries
        copies = np.empty((slots, possible_cpus()), VETH_COUNTERS_DTYPE)  # every slot is read
        if self.veth_counters.lookup_batch(np.empty(slots, "<u4"), copies) is None:
            for index in range(slots):
                copies[index] = np.frombuffer(
                    self.veth_counters.lookup(U32.pack(index)) or b"", VETH_COUNTERS_DTYPE
                )
        claimed = copies[copies["ifindex"] != 0]
        entry_ifindexes = np.array([U32.unpack(key)[0] for key, _ in entries], np.uint32)
        owners = np.concatenate([np.repeat(entry_ifindexes, possible_cpus()), claimed["ifindex"]])
        values = np.concatenate(
            [
                # a per-CPU hash: each value is a copy per possible CPU
                np.frombuffer(b"".join(value for _, value in entries), "<u8").reshape(-1, fields),
                claimed["counters"],
            ]
        )
        ifindexes, owner = np.unique(owners, return_inverse=True)
        sums = np.zeros((len(ifindexes), fields), np.uint64)
        np.add.at(sums, owner.ravel(), values)
        return ifindexes.tolist(), sums

    def read_ifindex_counters(self) -> dict[int, IfindexCounters]:
        ifindexes, sums = self._ifindex_sums()
        return {
            ifindex: IfindexCounters(*values[_COUNTERS_AFTER_TOTALS])
            for ifindex, values in zip(ifindexes, sums.tolist(), strict=True)
        }

    def read_endpoint_totals(self) -> dict[int, EndpointTotals]:
        """Each veth's exact totals, summed over CPUs (struct ifindex_counters)."""
        import numpy as np

        ifindexes, sums = self._ifindex_sums()
        column = _IFINDEX_COUNTERS_COLUMNS
        dropped = ("dropped", "unparsed_dropped", "held")
        totals = np.stack(
            [
                sums[:, column["packets"]],
                sums[:, column["bytes"]],
                sum(sums[:, column[f"{kind}_packets"]] for kind in dropped),
                sum(sums[:, column[f"{kind}_bytes"]] for kind in dropped),
                sums[:, column["overflow_packets"]],
                sums[:, column["overflow_bytes"]],
            ],
            axis=1,
        )
        return {
            ifindex: EndpointTotals(*row) for ifindex, row in zip(ifindexes, totals.tolist(), strict=True)
        }


def open_pinned_maps() -> Maps | None:
    """The maps a running (or departed) datapath left pinned, without compiling anything."""
    try:
        return Maps() if pins_exist() else None
    except OSError as exc:
        log.debug("pinned maps unusable: %s", exc)
        return None


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
