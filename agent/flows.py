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
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from agent.attribution import Attribution, format_address
from agent.datapath.layouts import take
from agent.datapath.maps import OVERFLOW_FAMILY, EndpointTotals
from agent.known_counters import KnownCounters, rows_of
from agent.model import (
    ContainerStats,
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
# After a refresh that held this many rows (a complete read of the table, or Flow objects:
# 100,000 new flows hold ~57 MB), freed memory is handed back to the system once that
# refresh's read and Snapshot are gone: glibc keeps it for reuse otherwise.
TRIM_AFTER_ROWS = 10_000
FORGET_KEYS_BEYOND = 4096  # keys kept before evicted ones are forgotten: 2x this or the table
DELTAS_DTYPE = np.dtype([(column, "<i8") for column in DELTA_FIELDS])
VETH_COLUMNS = 4  # bytes, packets, dropped packets, overflow packets of EndpointTotals


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


def _cumulative(stats: np.ndarray) -> np.ndarray:
    """(rows, 3) int64: each row's cumulative bytes, packets and dropped packets."""
    return np.stack([stats[column].astype(np.int64) for column in DELTA_FIELDS], axis=1)


def _return_freed_memory() -> None:
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; other libcs return memory themselves
    if trim is not None:
        trim(0)


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
        # the previous read's veth totals: sorted ifindexes, (bytes, packets, dropped, overflow) rows
        self._previous_totals = (np.empty(0, np.int64), np.empty((0, VETH_COLUMNS), np.int64))
        self._attribution = Attribution(Inventory())
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
        keys, stats = read.keys, read.stats
        if not real_flows.all():  # no copy of a complete read for the rows it keeps
            keys, stats = take(keys, real_flows), take(stats, real_flows)
        baseline = self._previous_ns is None
        interval = 0.0 if self._previous_ns is None else (read.monotonic_ns - self._previous_ns) / 1e9
        # Only the rows that can have moved are diffed and summed: on a complete read of
        # 100,000 mostly idle flows, a copy of every row per step held tens of MB at once.
        rows, deltas, restarted = self._deltas(keys, stats, read)
        self._previous_ns = read.monotonic_ns

        moved = np.flatnonzero(deltas["packets"] > 0)
        order = moved[np.argsort(-deltas["bytes"][moved], kind="stable")]
        if self._rows_held[0] > TRIM_AFTER_ROWS:  # the read and Snapshot before last are released
            _return_freed_memory()
        if self._attribution.inventory is not inventory:  # a refresh made a new one
            self._attribution = Attribution(inventory)
        attribution = self._attribution
        flows = (
            self._flows(take(keys, rows[order]), take(stats, rows[order]), take(deltas, order), attribution)
            if self._build_flows
            else []
        )
        self._rows_held.append(len(flows) + (len(read.keys) if read.complete else 0))

        owners = attribution.owners(keys["ifindex"][rows])
        egress = attribution.egress_by_kind(
            rows_of(keys, rows_of(rows, moved)), rows_of(deltas, moved), rows_of(owners, moved)
        )
        container_stats = self._container_stats(
            attribution, owners, deltas, egress, keys, stats, read, interval, baseline
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

    def _deltas(
        self, keys: np.ndarray, stats: np.ndarray, read: TableRead
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """(rows, deltas, restarted): the rows that can have moved since the previous read, their
        increase since, and how many flows restarted (evicted and re-created since: what they
        sent in between is missed); a flow not seen before is all new.

        Only flows whose last packet came after the previous read *started* can have
        moved (a packet counted during that read may have missed it), so only those are
        looked up: at 100,000 mostly idle flows this is most of the refresh saved."""
        since = self._previous_started_ns
        self._previous_started_ns = read.started_ns
        if since is None:  # the first read is the baseline
            self._counters.reset(keys, _cumulative(stats))
            return np.empty(0, np.intp), np.zeros(0, DELTAS_DTYPE), 0
        rows = np.flatnonzero(stats["last_seen_ns"] >= since)
        now = _cumulative(rows_of(stats, rows))
        before = self._counters.exchange(rows_of(keys, rows), now)
        # LRU eviction and re-creation can make a counter restart below the old value
        grown = np.where(now >= before, now - before, now)
        deltas = np.empty(len(rows), DELTAS_DTYPE)
        for index, column in enumerate(DELTA_FIELDS):
            deltas[column] = grown[:, index]
        restarted = int(np.count_nonzero(now[:, 1] < before[:, 1]))  # by packets
        if read.complete:
            self._keys_kept = 2 * max(len(keys), FORGET_KEYS_BEYOND)
            if len(self._counters) > self._keys_kept:
                # Keys the LRU evicted pile up in a churning table: forget them once they outnumber
                # the table, after this interval's deltas (re-basing instead would zero an interval).
                self._counters.keep_only(keys)
        return rows, deltas, restarted

    def _flows(
        self, keys: np.ndarray, stats: np.ndarray, deltas: np.ndarray, attribution: Attribution
    ) -> list[Flow]:
        """Flow objects for the given rows of the map."""
        counters = {name: stats[name].tolist() for name in FLOW_STATS_FIELDS}
        moved = {name: deltas[name].tolist() for name in DELTA_FIELDS}
        flows = []
        for row, key in enumerate(flow_keys(keys)):
            kind, name = attribution.classify(key.dst)
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
                    container=attribution.by_ifindex.get(key.ifindex),
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
        attribution: Attribution,
        owners: np.ndarray,
        deltas: np.ndarray,
        egress: list[EgressByKind],
        keys: np.ndarray,
        stats: np.ndarray,
        read: TableRead,
        interval: float,
        baseline: bool,
    ) -> dict[str, ContainerStats]:
        """All containers at once, summed by owner (row -> container number) in numpy. owners
        and deltas are of the rows that can have moved; keys and stats of every row."""
        observed = attribution.observed
        summed = np.stack(
            [deltas["bytes"], deltas["packets"], deltas["dropped_packets"], deltas["packets"] > 0], axis=1
        )
        bytes_delta, packets_delta, dropped_delta, active = attribution.per_container(
            owners, summed
        ).T.tolist()
        overflow_delta = [0] * len(observed)
        if read.endpoint_totals is None:  # summed over the whole table: evicted flows are missed
            every_owner = attribution.owners(keys["ifindex"])
            table = np.stack([stats["bytes"], stats["packets"]], axis=1)
            bytes_total, packets_total = attribution.per_container(every_owner, table).T.tolist()
            dropped_total = [
                sum(read.dropped_by_ifindex.get(ep.ifindex, 0) for ep in c.endpoints) for c in observed
            ]
        else:
            veths = self._veth_sums(read.endpoint_totals, baseline, attribution)
            bytes_total, packets_total, dropped_total, bytes_delta, packets_delta, overflow_delta = (
                veths.T.tolist()
            )

        result: dict[str, ContainerStats] = {}
        for number, container in enumerate(observed):
            history = self._history.get(container.id)
            if history is None:
                history = self._history[container.id] = deque(maxlen=self._history_length)
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
        if len(self._history) > len(result):
            for gone in set(self._history) - set(result):
                del self._history[gone]
        return result

    def _veth_sums(
        self, totals: Mapping[int, EndpointTotals], baseline: bool, attribution: Attribution
    ) -> np.ndarray:
        """Per container (rows of attribution.observed): bytes, packets, dropped packets, bytes
        delta, packets delta, overflow packets delta from the exact per-veth counters; the
        first read is the baseline."""
        ifindexes = np.fromiter(totals, np.int64, len(totals))
        now = np.array(
            [(t.bytes, t.packets, t.dropped_packets, t.overflow_packets) for t in totals.values()], np.int64
        ).reshape(len(totals), VETH_COLUMNS)
        order = np.argsort(ifindexes)
        ifindexes, now = ifindexes[order], now[order]
        before = now if baseline else np.zeros_like(now)
        known_ifindexes, known = self._previous_totals
        if not baseline and len(known_ifindexes):
            at = np.minimum(np.searchsorted(known_ifindexes, ifindexes), len(known_ifindexes) - 1)
            seen = known_ifindexes[at] == ifindexes
            before[seen] = known[at[seen]]
        self._previous_totals = (ifindexes, now)
        grown = np.where(now >= before, now - before, now)  # below before: a reused slot
        values = np.column_stack([now[:, :3], grown[:, 0], grown[:, 1], grown[:, 3]])
        return attribution.per_container(attribution.owners(ifindexes), values)
