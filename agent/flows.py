"""Flows layer: turn raw flow-table reads into attributed, classified per-interval flows.

Counters in the map are cumulative; each update() diffs them against the previous
read, which is the whole table or only the flows announced as moved
(agent/table_reader.py): both give the same deltas. Per-container totals come from
the datapath's exact per-veth counters when the read has them (whatever the flow table
evicted), else from the whole table with numpy. Flow objects are built only for flows
that moved in the interval, because at 100,000 flows building a Python object for each
idle one would cost most of the budget.
"""

from __future__ import annotations

import ctypes
import ipaddress
import socket
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from agent.datapath.maps import OVERFLOW_FAMILY, EndpointTotals
from agent.known_counters import KnownCounters, key_strings
from agent.model import (
    PROTO_NAMES,
    Container,
    ContainerStats,
    DstKind,
    EgressByKind,
    Flow,
    FlowCounters,
    FlowKey,
    IntervalLosses,
    Inventory,
    Snapshot,
    TableFill,
    Verdict,
)

RATE_HISTORY_LENGTH = 30
DELTA_FIELDS = ("bytes", "packets", "dropped_packets")
FLOW_STATS_FIELDS = (
    "bytes",
    "packets",
    "first_seen_ns",
    "last_seen_ns",
    "dropped_bytes",
    "dropped_packets",
    "rule_id",
    "verdict",
)
VERDICTS = tuple(Verdict)  # indexed by enum verdict in bpf/egress_maps.h
KINDS = tuple(DstKind)
KIND_NUMBERS = {kind: number for number, kind in enumerate(KINDS)}
NO_TOTALS = EndpointTotals(0, 0, 0, 0, 0, 0)
# After a refresh that held this many rows (a complete read of the table, or Flow objects:
# 100,000 new flows hold ~57 MB), freed memory is handed back to the system once that
# refresh's read and Snapshot are gone: glibc keeps it for reuse otherwise.
TRIM_AFTER_ROWS = 10_000
FORGET_KEYS_BEYOND = 4096  # keys kept before evicted ones are forgotten: 2x this or the table


@dataclass(frozen=True)
class TableRead:
    """What the flows layer needs from one datapath read (see datapath.FlowTableRead)."""

    keys: np.ndarray
    stats: np.ndarray
    monotonic_ns: int
    table_size: int
    flows_created: int
    dropped_by_ifindex: Mapping[int, int] = field(default_factory=dict)
    read_started_ns: int | None = None  # when the read began; monotonic_ns when not given
    # each veth's exact totals; without them container totals are summed over a complete read
    endpoint_totals: Mapping[int, EndpointTotals] | None = None
    complete: bool = True  # the whole table; else only the flows that moved since the last read
    moved_lost: int = 0  # moved-flow announcements lost since the last read

    @property
    def started_ns(self) -> int:
        return self.monotonic_ns if self.read_started_ns is None else self.read_started_ns


@lru_cache(maxsize=65536)
def format_address(family: int, raw: bytes) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def flow_keys(keys: np.ndarray) -> list[FlowKey]:
    """FlowKeys for rows of the flow map. Columns go to Python lists first: reading
    numpy scalars one field at a time costs several times more per flow."""
    columns = {name: keys[name].tolist() for name in ("ifindex", "family", "proto", "src_port", "dst_port")}
    src_addrs, dst_addrs = keys["src_addr"].tolist(), keys["dst_addr"].tolist()
    return [
        FlowKey(
            ifindex=columns["ifindex"][row],
            family=columns["family"][row],
            proto=columns["proto"][row],
            src=format_address(columns["family"][row], src_addrs[row]),
            dst=format_address(columns["family"][row], dst_addrs[row]),
            src_port=columns["src_port"][row],
            dst_port=columns["dst_port"][row],
        )
        for row in range(len(keys))
    ]


def _owners(keys: np.ndarray, observed: list[Container]) -> np.ndarray:
    """Each row's container number in `observed`; len(observed) for a veth of none of them."""
    owner_of_ifindex = {ep.ifindex: number for number, c in enumerate(observed) for ep in c.endpoints}
    if not owner_of_ifindex:
        return np.full(len(keys), len(observed), np.int64)
    # by searchsorted, not a dict lookup per row: a complete read of 100,000 rows took ~30 ms
    known = np.array(sorted(owner_of_ifindex), np.int64)
    numbers = np.array([owner_of_ifindex[ifindex] for ifindex in known.tolist()], np.int64)
    ifindexes = keys["ifindex"].astype(np.int64)
    at = np.minimum(np.searchsorted(known, ifindexes), len(known) - 1)
    return np.where(known[at] == ifindexes, numbers[at], len(observed))


def egress_by_kind(
    keys: np.ndarray, deltas: np.ndarray, owners: np.ndarray, containers: int, inventory: Inventory
) -> list[EgressByKind]:
    """Per container number: (protocol name, destination kind) -> (bytes, packets) of these
    rows (the flows that moved), with no Flow object each (what /metrics counts): each
    distinct destination is classified once, then rows are summed by group in numpy."""
    result: list[EgressByKind] = [{} for _ in range(containers)]
    ours = owners < containers
    keys, deltas, owners = keys[ours], deltas[ours], owners[ours]
    if not len(keys):
        return result
    destinations = np.empty((len(keys), 17), np.uint8)  # family, then the 16 address bytes
    destinations[:, 0] = keys["family"]
    destinations[:, 1:] = np.ascontiguousarray(keys["dst_addr"]).view(np.uint8).reshape(-1, 16)
    _, first_row, destination_of_row = np.unique(
        destinations.view("S17").ravel(), return_index=True, return_inverse=True
    )
    by_address = inventory.container_by_address()
    families, addresses = keys["family"].tolist(), keys["dst_addr"].tolist()
    kind_of_destination = np.array(
        [
            KIND_NUMBERS[
                classify_destination(format_address(families[row], addresses[row]), inventory, by_address)[0]
            ]
            for row in first_row.tolist()
        ],
        np.int64,
    )
    group_of_row = (owners * len(KINDS) + kind_of_destination[destination_of_row.ravel()]) * 256 + keys[
        "proto"
    ]
    groups, group_index = np.unique(group_of_row, return_inverse=True)
    sums = np.zeros((len(groups), 2), np.int64)
    np.add.at(sums, group_index.ravel(), np.stack([deltas["bytes"], deltas["packets"]], axis=1))
    for group, (sent_bytes, packets) in zip(groups.tolist(), sums.tolist(), strict=True):
        owner, kind_and_proto = divmod(group, len(KINDS) * 256)
        kind, proto = divmod(kind_and_proto, 256)
        result[owner][PROTO_NAMES.get(proto, str(proto)), str(KINDS[kind])] = (sent_bytes, packets)
    return result


def _return_freed_memory() -> None:
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other libcs return memory themselves
    if trim is not None:
        trim(0)


def classify_destination(
    dst: str, inventory: Inventory, by_address: Mapping[str, Container]
) -> tuple[DstKind, str | None]:
    """Where a destination is, from the host's point of view (decided here, not in the UI)."""
    container = by_address.get(dst)
    if container is not None:
        return DstKind.CONTAINER, container.name
    if dst in inventory.host_addresses:
        return DstKind.HOST, "host"
    address = ipaddress.ip_address(dst)
    if address.is_multicast:
        return DstKind.MULTICAST, None
    if address.version == 4 and dst == "255.255.255.255":
        return DstKind.BROADCAST, None
    return DstKind.EXTERNAL, None


class FlowAggregator:
    """Keeps the previous read and per-container rate history between intervals."""

    def __init__(self, history_length: int = RATE_HISTORY_LENGTH, build_flows: bool = True):
        """build_flows False: Snapshots carry container totals and no Flow objects, which
        cost most of a refresh (about 5 us each) when nobody reads them."""
        self._build_flows = build_flows
        # cumulative (bytes, packets, dropped_packets) per flow key at its last move
        self._counters = KnownCounters()
        self._previous_started_ns: int | None = None
        self._previous_ns: int | None = None
        self._history: dict[str, deque[float]] = {}
        self._history_length = history_length
        self._keys_kept = 2 * FORGET_KEYS_BEYOND
        self._table: TableFill | None = None
        self._created_at_count = (0, 0)  # (flows created, flows in the table) at the last count
        self._previous_totals: dict[int, EndpointTotals] = {}
        # rows the last two updates held: the caller holds the last one's read and Snapshot
        self._rows_held: deque[int] = deque([0, 0], maxlen=2)
        # monotonic -> wall clock, taken once so first_seen stays identical across intervals
        self._wall_offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)

    @property
    def full_read_wanted(self) -> bool:
        """No baseline yet, or evicted keys to forget, which only a complete read tells."""
        return self._previous_ns is None or len(self._counters) > self._keys_kept

    def update(self, read: TableRead, inventory: Inventory) -> Snapshot:
        assert read.complete or read.endpoint_totals is not None, "a partial read needs veth totals"
        real_flows = read.keys["family"] != OVERFLOW_FAMILY  # overflow shows in the veth totals
        keys, stats = read.keys[real_flows], read.stats[real_flows]
        baseline = self._previous_ns is None
        interval = 0.0 if self._previous_ns is None else (read.monotonic_ns - self._previous_ns) / 1e9
        deltas, restarted = self._deltas(keys, stats, read)
        self._previous_ns = read.monotonic_ns

        moved = np.flatnonzero(deltas["packets"] > 0)
        order = moved[np.argsort(-deltas["bytes"][moved], kind="stable")]
        if self._rows_held[0] > TRIM_AFTER_ROWS:  # the read and Snapshot before last are released
            _return_freed_memory()
        flows = self._flows(keys[order], stats[order], deltas[order], inventory) if self._build_flows else []
        self._rows_held.append(len(flows) + (len(read.keys) if read.complete else 0))

        observed = [c for c in inventory.containers if c.endpoints]
        owners = _owners(keys, observed)
        egress = egress_by_kind(keys[moved], deltas[moved], owners[moved], len(observed), inventory)
        container_stats = self._container_stats(
            observed, owners, stats, deltas, egress, read, interval, baseline
        )
        for flow in flows:
            if flow.container is not None and flow.container.id in container_stats:
                container_stats[flow.container.id].flows.append(flow)
        table = self._table_fill(read)
        losses = IntervalLosses(
            # never below 0: between complete reads the fill is an estimate
            evicted=max(0, table.evicted - self._table.evicted) if self._table else 0,
            moved_lost=read.moved_lost,
            full_read=read.complete,
            restarted_flows=restarted,
        )
        self._table = table
        return Snapshot(
            time=time.time(),
            interval=interval,
            stats=tuple(container_stats.values()),
            unobservable=tuple(c for c in inventory.containers if not c.endpoints),
            table=table,
            unattributed_flows=tuple(f for f in flows if f.container is None),
            losses=losses,
        )

    def _table_fill(self, read: TableRead) -> TableFill:
        """A complete read counts the table; between complete reads every flow created since
        is taken to be in it until the table is full (the LRU evicts only then)."""
        if read.complete:
            used = len(read.keys)
            self._created_at_count = (read.flows_created, used)
        else:
            created, counted = self._created_at_count
            used = min(read.table_size, counted + read.flows_created - created)
        return TableFill(used=used, size=read.table_size, evicted=max(0, read.flows_created - used))

    def _deltas(self, keys: np.ndarray, stats: np.ndarray, read: TableRead) -> tuple[np.ndarray, int]:
        """Per-row increase since the previous read, and how many flows restarted (evicted and
        re-created since: what they sent in between is missed); a flow not seen before is all new.

        Only flows whose last packet came after the previous read *started* can have
        moved (a packet counted during that read may have missed it), so only those are
        looked up: at 100,000 mostly idle flows this is most of the refresh saved."""
        deltas = np.zeros(len(stats), dtype=[(c, "<i8") for c in DELTA_FIELDS])
        since = self._previous_started_ns
        self._previous_started_ns = read.started_ns
        counters = np.stack([stats[c].astype(np.int64) for c in DELTA_FIELDS], axis=1)
        if since is None:  # the first read is the baseline
            self._counters.reset(key_strings(keys), counters)
            return deltas, 0
        rows = np.flatnonzero(stats["last_seen_ns"] >= since)
        now = counters[rows]
        before = self._counters.exchange(key_strings(keys[rows]), now)
        # LRU eviction and re-creation can make a counter restart below the old value
        grown = np.where(now >= before, now - before, now)
        for index, column in enumerate(DELTA_FIELDS):
            deltas[column][rows] = grown[:, index]
        restarted = int(np.count_nonzero(now[:, 1] < before[:, 1]))  # by packets
        if read.complete:
            self._keys_kept = 2 * max(len(keys), FORGET_KEYS_BEYOND)
            if len(self._counters) > self._keys_kept:
                # Keys the LRU evicted pile up in a churning table: forget them once they outnumber
                # the table, after this interval's deltas (re-basing instead would zero an interval).
                self._counters.keep_only(key_strings(keys))
        return deltas, restarted

    def _flows(
        self, keys: np.ndarray, stats: np.ndarray, deltas: np.ndarray, inventory: Inventory
    ) -> list[Flow]:
        """Flow objects for the given rows of the map."""
        by_ifindex = inventory.container_by_ifindex()
        by_address = inventory.container_by_address()
        kinds: dict[str, tuple[DstKind, str | None]] = {}
        counters = {name: stats[name].tolist() for name in FLOW_STATS_FIELDS}
        moved = {name: deltas[name].tolist() for name in DELTA_FIELDS}
        flows = []
        for row, key in enumerate(flow_keys(keys)):
            if key.dst not in kinds:
                kinds[key.dst] = classify_destination(key.dst, inventory, by_address)
            kind, name = kinds[key.dst]
            flow_counters = FlowCounters(
                bytes=counters["bytes"][row],
                packets=counters["packets"][row],
                first_seen_ns=counters["first_seen_ns"][row],
                last_seen_ns=counters["last_seen_ns"][row],
                dropped_bytes=counters["dropped_bytes"][row],
                dropped_packets=counters["dropped_packets"][row],
                rule_id=counters["rule_id"][row],
                verdict=VERDICTS[counters["verdict"][row]],
            )
            flows.append(
                Flow(
                    key=key,
                    counters=flow_counters,
                    container=by_ifindex.get(key.ifindex),
                    bytes_delta=moved["bytes"][row],
                    packets_delta=moved["packets"][row],
                    dropped_packets_delta=moved["dropped_packets"][row],
                    first_seen=self._wall_offset + flow_counters.first_seen_ns / 1e9,
                    last_seen=self._wall_offset + flow_counters.last_seen_ns / 1e9,
                    dst_kind=kind,
                    dst_name=name,
                )
            )
        return flows

    def _container_stats(
        self,
        observed: list[Container],
        owners: np.ndarray,
        stats: np.ndarray,
        deltas: np.ndarray,
        egress: list[EgressByKind],
        read: TableRead,
        interval: float,
        baseline: bool,
    ) -> dict[str, ContainerStats]:
        """One pass over the rows for all containers: owners (row -> container number) -> bincount."""

        def per_container(values: np.ndarray) -> list[int]:
            sums = np.bincount(owners, weights=values, minlength=len(observed) + 1)
            return [int(v) for v in sums[: len(observed)]]

        bytes_delta = per_container(deltas["bytes"])
        packets_delta = per_container(deltas["packets"])
        dropped_delta = per_container(deltas["dropped_packets"])
        active = per_container((deltas["packets"] > 0).astype(np.int64))
        overflow_delta = [0] * len(observed)
        if read.endpoint_totals is None:  # summed over the whole table: evicted flows are missed
            bytes_total, packets_total = per_container(stats["bytes"]), per_container(stats["packets"])
            dropped_total = [
                sum(read.dropped_by_ifindex.get(ep.ifindex, 0) for ep in c.endpoints) for c in observed
            ]
        else:
            veths = self._veth_totals(read.endpoint_totals, baseline)
            no_veth = (0,) * 6
            per_veth = [[veths.get(ep.ifindex, no_veth) for ep in c.endpoints] for c in observed]
            summed = [tuple(map(sum, zip(*rows, strict=True))) for rows in per_veth]
            bytes_total, packets_total, dropped_total, bytes_delta, packets_delta, overflow_delta = (
                (list(column) for column in zip(*summed, strict=True)) if summed else ([] for _ in range(6))
            )

        result: dict[str, ContainerStats] = {}
        for number, container in enumerate(observed):
            history = self._history.setdefault(container.id, deque(maxlen=self._history_length))
            if interval > 0:
                history.append(bytes_delta[number] / interval)
            result[container.id] = ContainerStats(
                container=container,
                bytes_total=bytes_total[number],
                packets_total=packets_total[number],
                bytes_delta=bytes_delta[number],
                packets_delta=packets_delta[number],
                dropped_packets_total=dropped_total[number],
                dropped_packets_delta=dropped_delta[number],
                active_flows=active[number],
                overflow_packets_delta=overflow_delta[number],
                rate_history=tuple(history),
                egress=egress[number],
            )
        for gone in set(self._history) - set(result):
            del self._history[gone]
        return result

    def _veth_totals(
        self, totals: Mapping[int, EndpointTotals], baseline: bool
    ) -> dict[int, tuple[int, int, int, int, int, int]]:
        """ifindex -> (bytes, packets, dropped packets, bytes delta, packets delta, overflow
        packets delta) from the exact per-veth counters; the first read is the baseline."""
        result = {}
        for ifindex, now in totals.items():
            before = now if baseline else self._previous_totals.get(ifindex, NO_TOTALS)

            def grown(name: str, now: EndpointTotals = now, before: EndpointTotals = before) -> int:
                current, previous = getattr(now, name), getattr(before, name)
                return current - previous if current >= previous else current  # a reused slot

            result[ifindex] = (
                now.bytes,
                now.packets,
                now.dropped_packets,
                grown("bytes"),
                grown("packets"),
                grown("overflow_packets"),
            )
        self._previous_totals = dict(totals)
        return result
