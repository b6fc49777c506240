"""Prometheus front end: the monitor's Snapshots as /metrics, beside the NDJSON export.

A custom collector builds every family from the latest state at scrape time instead of
mutating global metrics, so a removed container's series simply stop being produced
once its grace has passed. Egress counters are the sum of each interval's per-flow
deltas, kept here per container: the flow table's own counters restart when the LRU
evicts a flow, a Prometheus counter must not. Drops no rule decided (a veth held while
unknown, a packet dropped unparsed) come from the per-veth counters, which go when the veth
goes: they too are summed here as deltas between reads. Labels are bounded by design: container
name and compose labels, protocol, destination kind, rule id; never a destination
address, port or name (those stay in the flow records).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from agent.agent_status import AgentStatus
from agent.datapath import IfindexCounters, RuleHits
from agent.errors import EXIT_USAGE, UserError
from agent.latency import LatencyCounts
from agent.metrics_http import MetricsServer
from agent.metrics_process import ProcessMetrics
from agent.metrics_text import Family, Histogram, counter, gauge, render
from agent.model import Snapshot
from agent.policy import Rule

DEFAULT_LISTEN = "127.0.0.1:9847"
REMOVED_SERIES_GRACE_SECONDS = 60.0  # as Hubble: a removed container's series go after a minute
CONTAINER_LABELS = ("container", "compose_project", "compose_service")  # "" when not a compose one
PREFIX = "egress_top"

SeriesKey = tuple[str, str, str]  # values of CONTAINER_LABELS
# one veth's (held packets, held bytes, unparsed dropped packets, unparsed dropped bytes)
UnjudgedDrops = tuple[int, int, int, int]


@dataclass(frozen=True)
class AgentHealth:
    """What /metrics needs from the loop beside the Snapshot (given once per interval)."""

    status: AgentStatus
    attach_latency: LatencyCounts
    # read at scrape time, not every interval: one map lookup per rule, and there may be 10,000
    read_rule_hits: Callable[[], Sequence[tuple[Rule, RuleHits]]] = tuple
    # ifindex -> the veth's counters, cumulative while it exists; read at scrape time too
    read_veth_counters: Callable[[], Mapping[int, IfindexCounters]] = dict


@dataclass
class _ContainerSeries:
    # (proto, dst_kind) -> [bytes, packets] since the agent started
    egress: dict[tuple[str, str], list[int]] = field(default_factory=dict)
    overflow_packets: int = 0  # past the container's flow share: in its totals, in no flow
    unparsed_dropped: list[int] = field(default_factory=lambda: [0, 0])  # [packets, bytes]
    active_flows: int = 0
    gone_since: float | None = None  # monotonic time it was first missing from a Snapshot


class SnapshotMetrics:
    """Accumulates Snapshots; collect() turns the latest state into metric families."""

    def __init__(
        self, grace_seconds: float = REMOVED_SERIES_GRACE_SECONDS, clock: Callable[[], float] = time.monotonic
    ):
        self._grace = grace_seconds
        self._clock = clock
        self._lock = threading.Lock()  # update() runs in the loop, collect() in the HTTP thread
        self._series: dict[SeriesKey, _ContainerSeries] = {}
        self._latest: tuple[Snapshot, AgentHealth] | None = None
        self._evictions = 0
        self._moved_events_lost = 0
        self._flows_restarted = 0
        self._held = [0, 0]  # [packets, bytes] dropped on veths while unknown
        self._veth_drops_seen: dict[int, UnjudgedDrops] | None = None  # None: not read yet

    def update(self, snapshot: Snapshot, health: AgentHealth) -> None:
        now = self._clock()
        # the first interval's veth counters are the baseline: drops count from then on
        baseline = health.read_veth_counters() if self._veth_drops_seen is None else None
        with self._lock:
            if baseline is not None:
                self._veth_drops_seen = {ifindex: _unjudged(c) for ifindex, c in baseline.items()}
            present: set[SeriesKey] = set()
            for stats in snapshot.stats:
                c = stats.container
                key = (c.name, c.compose_project or "", c.compose_service or "")
                present.add(key)
                series = self._series.setdefault(key, _ContainerSeries())
                series.gone_since = None
                series.active_flows = stats.active_flows
                series.overflow_packets += stats.overflow_packets_delta
                for kind, (sent_bytes, packets) in stats.egress_by_kind().items():
                    totals = series.egress.setdefault(kind, [0, 0])
                    totals[0] += sent_bytes
                    totals[1] += packets
            for key, series in self._series.items():
                if key not in present and series.gone_since is None:
                    series.gone_since = now
                    series.active_flows = 0
            self._forget_removed(now)
            self._evictions = max(self._evictions, snapshot.table.evicted)  # never backwards
            self._moved_events_lost += snapshot.losses.moved_lost
            self._flows_restarted += snapshot.losses.restarted_flows
            self._latest = snapshot, health

    def _forget_removed(self, now: float) -> None:
        expired = [
            key
            for key, series in self._series.items()
            if series.gone_since is not None and now - series.gone_since >= self._grace
        ]
        for key in expired:
            del self._series[key]

    def collect(self) -> list[Family | Histogram]:
        """Called at each scrape; built whole under the lock, then handed over."""
        latest = self._latest
        if latest is None:
            return []  # nothing polled yet: no series rather than made-up zeros
        snapshot, health = latest
        rule_hits = health.read_rule_hits()  # outside the lock: the loop need not wait for it
        veth_counters = health.read_veth_counters()
        with self._lock:
            self._add_unjudged_drops(snapshot, veth_counters)
            self._forget_removed(self._clock())
            return [
                *self._container_families(),
                *self._drop_families(rule_hits),
                *self._health_families(snapshot, health),
            ]

    def _add_unjudged_drops(self, snapshot: Snapshot, veth_counters: Mapping[int, IfindexCounters]) -> None:
        """Each veth's growth since the last read: held drops to the agent's total (the veth
        had no owner then), unparsed drops to the container that owns the veth now."""
        owners = {
            endpoint.ifindex: (c.name, c.compose_project or "", c.compose_service or "")
            for c in (stats.container for stats in snapshot.stats)
            for endpoint in c.endpoints
        }
        seen = self._veth_drops_seen or {}  # set by the first update, before any collect
        now = {ifindex: _unjudged(counters) for ifindex, counters in veth_counters.items()}
        for ifindex, counts in now.items():
            before = seen.get(ifindex, (0, 0, 0, 0))
            # smaller than before: the ifindex is a new veth's (or the datapath reloaded)
            grown = [n - b for n, b in zip(counts, before, strict=True)]
            held_packets, held_bytes, unparsed_packets, unparsed_bytes = (
                counts if any(g < 0 for g in grown) else grown
            )
            self._held[0] += held_packets
            self._held[1] += held_bytes
            series = self._series.get(owners.get(ifindex, ("", "", "")))
            if series is not None and (unparsed_packets or unparsed_bytes):
                series.unparsed_dropped[0] += unparsed_packets
                series.unparsed_dropped[1] += unparsed_bytes
        self._veth_drops_seen = now

    def _container_families(self) -> Iterator[Family]:
        labels = (*CONTAINER_LABELS, "proto", "dst_kind")
        sent_bytes = Family(
            f"{PREFIX}_container_egress_bytes",
            "counter",
            "Bytes the container sent out of its veths since the agent started, dropped ones included.",
            labels,
        )
        sent_packets = Family(
            f"{PREFIX}_container_egress_packets",
            "counter",
            "Packets the container sent out of its veths since the agent started, dropped ones included.",
            labels,
        )
        overflow = Family(
            f"{PREFIX}_container_overflow_packets",
            "counter",
            "Packets past the container's flow share: counted, but in no proto/dst_kind series.",
            CONTAINER_LABELS,
        )
        active = Family(
            f"{PREFIX}_container_active_flows",
            "gauge",
            "Flows of the container that moved in the last interval.",
            CONTAINER_LABELS,
        )
        unparsed_packets = Family(
            f"{PREFIX}_container_unparsed_dropped_packets",
            "counter",
            "Packets dropped because the container has rules and their transport header was out of reach.",
            CONTAINER_LABELS,
        )
        unparsed_bytes = Family(
            f"{PREFIX}_container_unparsed_dropped_bytes",
            "counter",
            "Bytes of the packets counted in container_unparsed_dropped_packets.",
            CONTAINER_LABELS,
        )
        for key, series in sorted(self._series.items()):
            active.add(key, series.active_flows)
            overflow.add(key, series.overflow_packets)
            if any(series.unparsed_dropped):  # as egress: no series before the first such drop
                unparsed_packets.add(key, series.unparsed_dropped[0])
                unparsed_bytes.add(key, series.unparsed_dropped[1])
            for (proto, kind), (byte_count, packet_count) in sorted(series.egress.items()):
                sent_bytes.add((*key, proto, kind), byte_count)
                sent_packets.add((*key, proto, kind), packet_count)
        yield from (sent_bytes, sent_packets, overflow, active, unparsed_packets, unparsed_bytes)

    def _drop_families(self, rule_hits: Sequence[tuple[Rule, RuleHits]]) -> Iterator[Family]:
        """Drops by block rule, under the labels of the container the rule names (while it has
        series): rule hits are cumulative in the datapath and rule ids are never reused."""
        labels = (*CONTAINER_LABELS, "rule_id")
        dropped_packets = Family(
            f"{PREFIX}_container_dropped_packets", "counter", "Packets a block rule dropped.", labels
        )
        dropped_bytes = Family(
            f"{PREFIX}_container_dropped_bytes", "counter", "Bytes a block rule dropped.", labels
        )
        # the running container's labels win over a removed namesake's: present ones come last
        by_name = {
            key[0]: key for key in sorted(self._series, key=lambda k: self._series[k].gone_since is None)
        }
        for rule, hits in rule_hits:
            key = by_name.get(rule.container)
            if rule.action != "block" or key is None:
                continue
            dropped_packets.add((*key, str(rule.rule_id)), hits.packets)
            dropped_bytes.add((*key, str(rule.rule_id)), hits.bytes)
        yield from (dropped_packets, dropped_bytes)

    def _health_families(self, snapshot: Snapshot, health: AgentHealth) -> Iterator[Family | Histogram]:
        status = health.status
        yield _histogram(
            f"{PREFIX}_attach_latency_seconds",
            "Time from a new veth's link event to the datapath attached to it.",
            health.attach_latency,
        )
        yield counter(
            f"{PREFIX}_inventory_refresh_retries",
            "Inventory refreshes (Docker, netlink) retried after an error.",
            status.refresh_retries,
        )
        yield counter(
            f"{PREFIX}_inventory_refresh_failures",
            "Inventory refreshes that failed after their retries.",
            status.refresh_failures,
        )
        yield gauge(f"{PREFIX}_flow_table_used", "Flows in the datapath's flow table.", snapshot.table.used)
        yield gauge(f"{PREFIX}_flow_table_size", "Flows the flow table holds at most.", snapshot.table.size)
        yield counter(
            f"{PREFIX}_flow_table_evictions",
            "Flows the LRU pushed out of the flow table since the datapath was loaded.",
            self._evictions,
        )
        yield counter(
            f"{PREFIX}_moved_events_lost",
            "Moved-flow announcements lost to a full ring buffer (a full table read made up for them).",
            self._moved_events_lost,
        )
        yield counter(
            f"{PREFIX}_flows_restarted",
            "Flows evicted and re-created between two reads: their packets in between were missed.",
            self._flows_restarted,
        )
        yield gauge(
            f"{PREFIX}_containers_enforced",
            "Running containers with rules in force on every veth.",
            len(status.containers_enforced),
        )
        yield gauge(
            f"{PREFIX}_containers_not_enforced",
            "Running containers whose rules are not in force on every veth (see egress-agent status).",
            len(status.not_enforced),
        )
        yield gauge(f"{PREFIX}_rules", "Rules in the rule store.", status.rules)
        yield counter(
            f"{PREFIX}_unknown_veth_held_packets",
            "Packets dropped on veths not yet known to the agent (held closed while any rule exists).",
            self._held[0],
        )
        yield counter(
            f"{PREFIX}_unknown_veth_held_bytes",
            "Bytes of the packets counted in unknown_veth_held_packets.",
            self._held[1],
        )


def _unjudged(counters: IfindexCounters) -> UnjudgedDrops:
    return (
        counters.held_packets,
        counters.held_bytes,
        counters.unparsed_dropped_packets,
        counters.unparsed_dropped_bytes,
    )


def _histogram(name: str, documentation: str, latency: LatencyCounts) -> Histogram:
    cumulative, buckets = 0, []
    for bound, count in zip((*map(str, latency.bounds), "+Inf"), latency.counts, strict=True):
        cumulative += count
        buckets.append((bound, cumulative))
    return Histogram(name, documentation, tuple(buckets), latency.total_seconds)


def parse_listen(text: str) -> tuple[str, int] | None:
    """ADDR:PORT (IPv6 in brackets) -> (host, port); "off" -> None."""
    if text == "off":
        return None
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise UserError(
            f"--metrics {text!r}: give ADDR:PORT (e.g. {DEFAULT_LISTEN} or [::1]:9847) or 'off'", EXIT_USAGE
        )
    return host, int(port)


@contextlib.contextmanager
def serving(listen: tuple[str, int] | None, metrics: SnapshotMetrics) -> Iterator[Callable[[], None]]:
    """/metrics on listen (in a daemon thread) until the block ends, or until the stop it
    yields is called (before the datapath closes, so no scrape reads a closed map)."""
    if listen is None:
        yield lambda: None
        return
    process = ProcessMetrics()  # the agent's own CPU and memory, after the Snapshot's families
    host, port = listen
    try:
        server = MetricsServer(host, port, lambda: render([*metrics.collect(), *process.collect()]))
    except OSError as exc:
        raise UserError(
            f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}: "
            "choose another with --metrics ADDR:PORT, or --metrics off",
            EXIT_USAGE,
        ) from None
    try:
        yield server.stop
    finally:
        server.stop()
