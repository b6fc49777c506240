"""The pinned maps, read and written by raw bpf syscalls: no BCC, no compile, any process.

Every layout here mirrors a struct in bpf/egress_maps.h.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from agent.datapath.flow_maps import FlowMaps
from agent.datapath.percpu import possible_cpus
from agent.datapath.pinned import PinnedMap
from agent.datapath.policy_maps import U32, PolicyMaps

if TYPE_CHECKING:
    import numpy as np

    from agent.datapath.mapped_array import MappedArray

log = logging.getLogger(__name__)

LAYOUT_VERSION = 10  # EGRESS_TOP_LAYOUT in bpf/egress_maps.h
BPFFS = Path("/sys/fs/bpf")
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


class Maps(PolicyMaps, FlowMaps):
    """Every pinned map of ours, read and written as bytes laid out as in bpf/egress_maps.h:
    the per-veth counters and the config here, endpoints, policy and rule hits in PolicyMaps
    (agent/datapath/policy_maps.py), the flow table, its cache and the moved flows in
    FlowMaps (agent/datapath/flow_maps.py)."""

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
        self.flow_copies = possible_cpus() if self.flows.percpu else 1
        self._config_memory = mmap.mmap(
            self.datapath_config.fd, mmap.PAGESIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._config: DatapathConfig | None = DatapathConfig.from_buffer(self._config_memory)
        self._veth_slots: MappedArray | None = None  # mapped by the first read of the counters
        self._open_flow_reads()

    def close(self) -> None:
        self._config = None  # the mmap cannot close while a view of it lives
        self._config_memory.close()
        self._close_flow_reads()
        if self._veth_slots is not None:
            self._veth_slots.close()
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

    # --- per-veth counters -------------------------------------------------

    def _ifindex_sums(self) -> tuple[list[int], np.ndarray]:
        """(ifindexes, one row of struct ifindex_counters u64 fields each) per veth: its claimed
        veth_counters copies plus its ifindex_counters entry (bpf/egress_maps.h, struct
        veth_counters), all summed in numpy at once (a mask and objects per veth cost ~10 us
        each at 200 veths, every interval)."""
        import numpy as np

        from agent.datapath.layouts import VETH_COUNTERS_DTYPE, take
        from agent.datapath.mapped_array import MappedArray

        fields = _IFINDEX_COUNTERS.size // 8
        entries = self.ifindex_counters.items()
        if self._veth_slots is None:
            self._veth_slots = MappedArray(self.veth_counters, VETH_COUNTERS_DTYPE)
        copies = self._veth_slots.read()  # every CPU's every slot
        claimed = take(copies, copies["ifindex"] != 0)
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
