"""Flows layer: turn raw flow-table reads into attributed, classified per-interval flows.

Counters in the map are cumulative; each update() diffs them against the previous
read. Per-container totals are computed with numpy over the whole table; Flow
objects are built only for flows that moved in the interval, because at 100,000
flows building a Python object for each idle one would cost most of the budget.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from agent.model import (
    Container,
    ContainerStats,
    DstKind,
    Flow,
    FlowCounters,
    FlowKey,
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
VERDICT_DROPPED = 1  # enum verdict in bpf/egress_maps.h
NO_COUNTERS = (0, 0, 0)


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

    @property
    def started_ns(self) -> int:
        return self.monotonic_ns if self.read_started_ns is None else self.read_started_ns


@lru_cache(maxsize=65536)
def format_address(family: int, raw: bytes) -> str:
    if family == 4:
        return socket.inet_ntop(socket.AF_INET, raw[:4])
    return socket.inet_ntop(socket.AF_INET6, raw)


def _key_bytes(keys: np.ndarray) -> list[bytes]:
    return keys.view(f"S{keys.dtype.itemsize}").ravel().tolist() if len(keys) else []


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

    def __init__(self, history_length: int = RATE_HISTORY_LENGTH):
        # cumulative (bytes, packets, dropped_packets) per flow key at its last move
        self._counters: dict[bytes, tuple[int, int, int]] = {}
        self._previous_started_ns: int | None = None
        self._previous_ns: int | None = None
        self._history: dict[str, deque[float]] = {}
        self._history_length = history_length
        # monotonic -> wall clock, taken once so first_seen stays identical across intervals
        self._wall_offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)

    def update(self, read: TableRead, inventory: Inventory) -> Snapshot:
        keys, stats = read.keys, read.stats
        interval = (read.monotonic_ns - self._previous_ns) / 1e9 if self._previous_ns is not None else 0.0
        deltas = self._deltas(keys, stats, read.started_ns)
        self._previous_ns = read.monotonic_ns

        moved = np.flatnonzero(deltas["packets"] > 0)
        order = moved[np.argsort(-deltas["bytes"][moved], kind="stable")]
        flows = self._flows(keys[order], stats[order], deltas[order], inventory)

        container_stats = self._container_stats(keys, stats, deltas, inventory, read, interval)
        for flow in flows:
            if flow.container is not None and flow.container.id in container_stats:
                container_stats[flow.container.id].flows.append(flow)
        used = len(keys)
        return Snapshot(
            time=time.time(),
            interval=interval,
            stats=tuple(container_stats.values()),
            unobservable=tuple(c for c in inventory.containers if not c.endpoints),
            table=TableFill(used=used, size=read.table_size, evicted=max(0, read.flows_created - used)),
            unattributed_flows=tuple(f for f in flows if f.container is None),
        )

    def _deltas(self, keys: np.ndarray, stats: np.ndarray, read_started_ns: int) -> np.ndarray:
        """Per-row increase since the previous read; a flow not seen before is all new.

        Only flows whose last packet came after the previous read *started* can have
        moved (a packet counted during that read may have missed it), so only those are
        looked up: at 100,000 mostly idle flows this is most of the refresh saved."""
        deltas = np.zeros(len(stats), dtype=[(c, "<i8") for c in DELTA_FIELDS])
        since = self._previous_started_ns
        self._previous_started_ns = read_started_ns
        if since is None or len(self._counters) > 2 * max(len(keys), 4096):
            # the first read is a baseline; a table that churned a lot is re-based (drops evicted keys)
            self._counters = dict(
                zip(
                    _key_bytes(keys),
                    zip(*(stats[c].tolist() for c in DELTA_FIELDS), strict=True),
                    strict=True,
                )
            )
            return deltas
        rows = np.flatnonzero(stats["last_seen_ns"] >= since)
        current = list(zip(*(stats[c][rows].tolist() for c in DELTA_FIELDS), strict=True))
        previous = [self._counters.get(key, NO_COUNTERS) for key in _key_bytes(keys[rows])]
        for key, counters in zip(_key_bytes(keys[rows]), current, strict=True):
            self._counters[key] = counters
        for index, column in enumerate(DELTA_FIELDS):
            now = np.array([c[index] for c in current], np.int64)
            before = np.array([p[index] for p in previous], np.int64)
            # LRU eviction and re-creation can make a counter restart below the old value
            deltas[column][rows] = np.where(now >= before, now - before, now)
        return deltas

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
                verdict=Verdict.DROPPED if counters["verdict"][row] == VERDICT_DROPPED else Verdict.FORWARDED,
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
        keys: np.ndarray,
        stats: np.ndarray,
        deltas: np.ndarray,
        inventory: Inventory,
        read: TableRead,
        interval: float,
    ) -> dict[str, ContainerStats]:
        observed = [c for c in inventory.containers if c.endpoints]
        # One pass over the table for all containers: row -> container number -> bincount.
        owner_of_ifindex = {ep.ifindex: number for number, c in enumerate(observed) for ep in c.endpoints}
        owners = np.fromiter(
            (owner_of_ifindex.get(i, len(observed)) for i in keys["ifindex"].tolist()), np.int64, len(keys)
        )

        def per_container(values: np.ndarray) -> list[int]:
            sums = np.bincount(owners, weights=values, minlength=len(observed) + 1)
            return [int(v) for v in sums[: len(observed)]]

        bytes_total = per_container(stats["bytes"])
        packets_total = per_container(stats["packets"])
        bytes_delta = per_container(deltas["bytes"])
        packets_delta = per_container(deltas["packets"])
        dropped_delta = per_container(deltas["dropped_packets"])
        active = per_container((deltas["packets"] > 0).astype(np.int64))

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
                dropped_packets_total=sum(
                    read.dropped_by_ifindex.get(ep.ifindex, 0) for ep in container.endpoints
                ),
                dropped_packets_delta=dropped_delta[number],
                active_flows=active[number],
                rate_history=tuple(history),
            )
        for gone in set(self._history) - set(result):
            del self._history[gone]
        return result
