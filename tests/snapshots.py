"""Fixed snapshots for front-end tests: two containers, their flows, two not observed."""

from __future__ import annotations

from agent.model import (
    Container,
    ContainerStats,
    DstKind,
    Endpoint,
    Flow,
    FlowCounters,
    FlowKey,
    Snapshot,
    TableFill,
    Verdict,
)

NOW = 1_700_000_000.0


def container(name: str, ip: str, ifindex: int, **extra) -> Container:  # type: ignore[no-untyped-def]
    return Container(
        id=name[0] * 64,
        name=name,
        image="img:1",
        endpoints=(Endpoint(ifindex, f"veth{ifindex}", "net", "br-x", ip),),
        **extra,
    )


def flow(owner: Container, dst: str, dport: int, proto: int, delta: int, total: int, **extra) -> Flow:  # type: ignore[no-untyped-def]
    family = 6 if ":" in dst else 4
    return Flow(
        key=FlowKey(owner.endpoints[0].ifindex, family, proto, owner.addresses[0], dst, 40000, dport),
        counters=FlowCounters(bytes=total, packets=10, first_seen_ns=0, last_seen_ns=0, **extra),
        container=owner,
        bytes_delta=delta,
        packets_delta=delta // 100,
        dropped_packets_delta=0,
        first_seen=NOW - 125,
        last_seen=NOW,
        dst_kind=DstKind.EXTERNAL,
    )


WEB = container("web", "172.20.0.2", 10, compose_service="frontend", netns_sharers=("sidecar",))
DB = container("a-database-with-a-very-long-name", "172.20.0.3", 11)
WEB_STATS = ContainerStats(
    WEB,
    bytes_total=3 * 1024 * 1024,
    packets_total=900,
    bytes_delta=250_000,
    packets_delta=2500,
    active_flows=2,
    dropped_packets_total=7,
    flows=[
        flow(WEB, "198.51.100.7", 443, 6, 200_000, 2_000_000),
        flow(WEB, "2001:db8::1", 53, 17, 50_000, 60_000, verdict=Verdict.DROPPED),
    ],
)
DB_STATS = ContainerStats(
    DB, bytes_total=10_000_000, packets_total=5, bytes_delta=1000, packets_delta=5, active_flows=1
)
HOSTNET = Container(
    id="h" * 64, name="agent", image="x", unobservable_reason="host network: its traffic crosses no veth"
)
SIDECAR = Container(id="s" * 64, name="sidecar", image="x", netns_owner="web")
SNAPSHOT = Snapshot(
    time=NOW,
    interval=1.0,
    stats=(DB_STATS, WEB_STATS),
    unobservable=(HOSTNET, SIDECAR),
    table=TableFill(used=3, size=65536, evicted=2),
)
