"""The flow side of the pinned maps (mixed into Maps): reads of the flow table with the
flow cache's counts added (agent/datapath/flow_cache.py), the moved-flows ring buffer the
delta reads follow, the epoch that drives it, and the flow share. Layouts as in
bpf/egress_maps.h; the numpy ones (agent/datapath/layouts.py) load with the first read.
"""

from __future__ import annotations

import ctypes
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agent.datapath.percpu import merge_flow_copies
from agent.datapath.policy_maps import U32
from agent.datapath.ringbuf import RingBuffer
from agent.datapath.syscalls import BPF_MAP_LOOKUP_ELEM, MapElemAttr, bpf_each, sys_bpf

if TYPE_CHECKING:
    import numpy as np

    from agent.datapath.flow_cache import FlowCache
    from agent.datapath.flow_lookup import FlowLookup
    from agent.datapath.maps import DatapathConfig
    from agent.datapath.pinned import PinnedMap

# The datapath stamps flows with CLOCK_MONOTONIC_COARSE (clock id 6 on Linux, not in Python's
# time module), read once per jiffy: behind CLOCK_MONOTONIC by up to the last timekeeping
# update (measured here up to 7.4 ms, under two ticks of 4 ms) plus a tick. A read that
# started at t may miss a packet stamped a little before t, so its started_ns is put four
# ticks earlier.
CLOCK_MONOTONIC_COARSE = 6
COARSE_CLOCK_SLACK_NS = 4 * round(time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9)
STAT_FLOWS_CREATED = 0
STAT_MOVED_LOST = 2
MOVED_FLOWS_BYTES = 1 << 22  # the moved_flows ring buffer's data bytes


@dataclass(frozen=True)
class FlowTableRead:
    """One read of the flow map: parallel arrays, plus when it was taken."""

    keys: np.ndarray  # FLOW_KEY_DTYPE
    stats: np.ndarray  # FLOW_STATS_DTYPE
    monotonic_ns: int  # when the read ended
    started_ns: int  # when it began, less COARSE_CLOCK_SLACK_NS: a flow counted since may or may not be in it


class FlowMaps:
    """The flow table, the flow cache, moved_flows and the datapath stats; Maps opens the
    pins and calls _open_flow_reads and _close_flow_reads."""

    flows: PinnedMap
    flow_cache: PinnedMap
    moved_flows: PinnedMap
    datapath_stats: PinnedMap
    config: DatapathConfig
    flow_table_size: int
    flow_copies: int  # flow_stats copies per lookup: 1, the flow table is shared (struct flow_stats)

    def _open_flow_reads(self) -> None:
        self._batch_supported = True
        self._flow_lookup_loaded = False
        self._batched_lookup: FlowLookup | None = None
        self._flow_cache: FlowCache | None = None
        self._moved_ring: RingBuffer | None = None  # mapped by the first read_moved_keys
        self._moved_lost_seen = 0

    def _close_flow_reads(self) -> None:
        for opened in (self._moved_ring, self._batched_lookup, self._flow_cache):
            if opened is not None:
                opened.close()

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
        from agent.datapath.layouts import take

        batched = self._flow_lookup()
        if batched is not None:
            found, stats = batched.lookup(wanted)
        else:
            found, copies = self._lookup_each(wanted)
            stats = merge_flow_copies(take(copies, found))
        return take(wanted, found), stats

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


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)
