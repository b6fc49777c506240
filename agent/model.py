"""Plain data shared by the layers: inventory -> flows/policy -> front ends.

Nothing here talks to the kernel or to Docker, so every front end can be tested on
fixed data built from these classes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


@dataclass(frozen=True)
class Endpoint:
    """One container interface that has a host-side veth we can attach to."""

    ifindex: int  # host-side veth ifindex (== iflink of the container's interface)
    veth: str  # host-side veth name, e.g. "veth1a2b3c4"
    network: str  # Docker network name, e.g. "bridge" or "web_default"
    bridge: str  # Linux bridge the veth is enslaved to, e.g. "docker0"
    ipv4: str | None = None
    ipv6: str | None = None


@dataclass(frozen=True)
class Container:
    """A running container as the inventory sees it."""

    id: str  # full 64-hex id
    name: str  # without the leading "/"
    image: str
    compose_project: str | None = None
    compose_service: str | None = None
    endpoints: tuple[Endpoint, ...] = ()
    # Set when this container joined another's netns (--network container:X): its
    # traffic is counted on, and attributed to, the owner named here.
    netns_owner: str | None = None
    # Names of containers that joined this one's netns.
    netns_sharers: tuple[str, ...] = ()
    # Why we cannot see this container's egress (host/none network, macvlan...);
    # None when at least one endpoint is observed or the netns owner is.
    unobservable_reason: str | None = None

    @property
    def why_not_observed(self) -> str | None:
        """Why this container has no row of its own, or None when it has one."""
        if self.netns_owner:
            return f"shares the network namespace of {self.netns_owner} (counted there)"
        return self.unobservable_reason

    @property
    def addresses(self) -> tuple[str, ...]:
        return tuple(a for ep in self.endpoints for a in (ep.ipv4, ep.ipv6) if a)

    @property
    def display_name(self) -> str:
        """Name plus compose service when it says something the name does not."""
        if self.compose_service and self.compose_service not in self.name:
            return f"{self.name} ({self.compose_service})"
        return self.name


@dataclass(frozen=True)
class Inventory:
    """Everything the control plane knows about containers at one moment."""

    containers: tuple[Container, ...] = ()
    # Docker bridge names (docker0, br-<id>): veths enslaved to them are ours to watch.
    bridges: frozenset[str] = frozenset()
    # Addresses owned by the host itself (bridge gateways included): dst_kind "host".
    host_addresses: frozenset[str] = frozenset()

    def container_by_ifindex(self) -> dict[int, Container]:
        return {ep.ifindex: c for c in self.containers for ep in c.endpoints}

    def container_by_address(self) -> dict[str, Container]:
        return {addr: c for c in self.containers for addr in c.addresses}

    def find(self, ref: str) -> Container | None:
        """A container by exact name, compose service, or id prefix (>= 4 hex chars)."""
        for c in self.containers:
            if ref in (c.name, c.id):
                return c
        by_service = [c for c in self.containers if c.compose_service == ref]
        if len(by_service) == 1:
            return by_service[0]
        if len(ref) >= 4:
            by_prefix = [c for c in self.containers if c.id.startswith(ref)]
            if len(by_prefix) == 1:
                return by_prefix[0]
        return None


class DstKind(StrEnum):
    CONTAINER = "container"
    HOST = "host"
    EXTERNAL = "external"
    MULTICAST = "multicast"
    BROADCAST = "broadcast"


class Verdict(StrEnum):
    """enum verdict in bpf/egress_maps.h, in its order."""

    FORWARDED = "forwarded"
    DROPPED = "dropped"  # a block rule matched
    DROPPED_UNPARSED = "dropped_unparsed"  # the container has rules, its transport header was out of reach
    HELD = "held"  # its veth was not yet known to the agent, which holds unknown veths


@dataclass(frozen=True, slots=True)  # slots: 17 MB less when 100,000 flows move in one interval
class FlowKey:
    """A flow as the datapath keys it (see bpf/egress_maps.h: struct flow_key)."""

    ifindex: int
    family: int  # 4 or 6
    proto: int  # IP protocol number
    src: str
    dst: str
    src_port: int  # ICMP/ICMPv6: the type
    dst_port: int  # ICMP/ICMPv6: the code


@dataclass(frozen=True, slots=True)  # slots: as FlowKey
class FlowCounters:
    """Cumulative counters the datapath keeps for one flow (struct flow_stats)."""

    bytes: int
    packets: int
    first_seen_ns: int  # CLOCK_MONOTONIC
    last_seen_ns: int
    dropped_bytes: int = 0
    dropped_packets: int = 0
    rule_id: int = 0  # policy rule that decided the last packet, 0 for none
    verdict: Verdict = Verdict.FORWARDED


@dataclass(frozen=True, slots=True)  # slots: as FlowKey
class Flow:
    """One flow in one interval, attributed and classified."""

    key: FlowKey
    counters: FlowCounters
    container: Container | None  # None: veth not (yet) mapped to a container
    bytes_delta: int
    packets_delta: int
    dropped_packets_delta: int
    first_seen: float  # wall clock, seconds since the epoch
    last_seen: float
    dst_kind: DstKind
    dst_name: str | None = None  # the container's name for dst_kind container, "host" for host

    @property
    def proto_name(self) -> str:
        return PROTO_NAMES.get(self.key.proto, str(self.key.proto))


EgressByKind = dict[tuple[str, str], tuple[int, int]]  # (proto name, dst kind) -> (bytes, packets)


@dataclass
class ContainerStats:
    """Per-container totals for one interval: one row of egress-top."""

    container: Container
    bytes_total: int = 0
    packets_total: int = 0
    bytes_delta: int = 0
    packets_delta: int = 0
    dropped_packets_total: int = 0
    dropped_packets_delta: int = 0
    active_flows: int = 0  # flows that moved in this interval
    # packets past the container's flow share this interval: counted in its totals, in no flow
    overflow_packets_delta: int = 0
    flows: list[Flow] = field(default_factory=list)  # all of its flows, busiest first
    # bytes/s of the last intervals, oldest first, for the sparkline
    rate_history: tuple[float, ...] = ()
    # this interval's egress by (protocol name, destination kind), as the flows layer sums it
    # without building Flow objects; None (stats made by hand): summed from `flows`
    egress: EgressByKind | None = None

    def egress_by_kind(self) -> EgressByKind:
        """(protocol name, destination kind) -> (bytes, packets) that moved this interval."""
        if self.egress is not None:
            return self.egress
        sums: dict[tuple[str, str], tuple[int, int]] = {}
        for flow in self.flows:
            sent_bytes, packets = sums.get((flow.proto_name, str(flow.dst_kind)), (0, 0))
            sums[flow.proto_name, str(flow.dst_kind)] = (
                sent_bytes + flow.bytes_delta,
                packets + flow.packets_delta,
            )
        return sums


@dataclass(frozen=True)
class TableFill:
    used: int
    size: int
    evicted: int  # flows the LRU pushed out since the datapath was loaded


@dataclass(frozen=True)
class IntervalLosses:
    """What the interval's flows may miss and why: the interval record, the screen's header."""

    evicted: int = 0  # flows the LRU pushed out this interval (their last packets may be missed)
    moved_lost: int = 0  # moved-flow announcements the full ring buffer lost: a full read followed
    full_read: bool = True  # the whole table was read, not only the flows announced as moved
    restarted_flows: int = 0  # flows evicted and re-created between reads: packets in between missed


@dataclass(frozen=True)
class Snapshot:
    """What one refresh produced; every front end renders from this alone."""

    time: float  # wall clock at the end of the interval
    interval: float  # seconds the deltas cover
    stats: tuple[ContainerStats, ...]  # observable containers (and unmapped veths)
    unobservable: tuple[Container, ...]
    table: TableFill
    unattributed_flows: tuple[Flow, ...] = ()  # veth not mapped to a container yet
    not_enforced: tuple[str, ...] = ()  # running containers with rules not in force on every veth
    losses: IntervalLosses = IntervalLosses()

    @property
    def flows(self) -> list[Flow]:
        return [f for s in self.stats for f in s.flows] + list(self.unattributed_flows)

    @property
    def total_bytes_delta(self) -> int:
        return sum(s.bytes_delta for s in self.stats)

    @property
    def overflow_packets(self) -> dict[str, int]:
        """Container name -> packets past its flow share this interval, where any."""
        return {s.container.name: s.overflow_packets_delta for s in self.stats if s.overflow_packets_delta}


PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmpv6", 132: "sctp", 47: "gre", 50: "esp"}
PROTO_NUMBERS = {name: number for number, name in PROTO_NAMES.items()}
