"""The flows layer on fixed tables: deltas, attribution, classification, evictions."""

from __future__ import annotations

import ipaddress
import json
import time
from dataclasses import replace
from importlib.resources import files

import jsonschema
import numpy as np

from agent.datapath import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE
from agent.export import flow_record, write_ndjson
from agent.flows import FlowAggregator, TableRead
from agent.model import Container, DstKind, Endpoint, Inventory

WEB = Container(
    id="a" * 64,
    name="web",
    image="nginx",
    endpoints=(Endpoint(ifindex=10, veth="vethweb", network="front", bridge="br-1", ipv4="172.20.0.2"),),
    compose_project="shop",
    compose_service="web",
)
DB = Container(
    id="b" * 64,
    name="db",
    image="postgres",
    endpoints=(Endpoint(ifindex=11, veth="vethdb", network="front", bridge="br-1", ipv4="172.20.0.3"),),
)
HOSTNET = Container(id="c" * 64, name="agent", image="x", unobservable_reason="host network: ...")
INVENTORY = Inventory(
    containers=(WEB, DB, HOSTNET),
    bridges=frozenset({"br-1"}),
    host_addresses=frozenset({"172.20.0.1"}),
)


def table(*flows: tuple[int, str, str, int, int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(ifindex, src, dst, proto, sport, dport, bytes, packets) rows -> map-shaped arrays."""
    keys = np.zeros(len(flows), FLOW_KEY_DTYPE)
    stats = np.zeros(len(flows), FLOW_STATS_DTYPE)
    for row, (ifindex, src, dst, proto, sport, dport, nbytes, packets) in enumerate(flows):
        source, destination = ipaddress.ip_address(src), ipaddress.ip_address(dst)
        keys[row] = (
            ifindex,
            source.version,
            proto,
            sport,
            dport,
            0,
            source.packed.ljust(16, b"\0"),
            destination.packed.ljust(16, b"\0"),
        )
        counters = {"bytes": nbytes, "packets": packets, "first_seen_ns": 10**9, "last_seen_ns": 2 * 10**9}
        for name, value in counters.items():  # by name: the struct grows fields
            stats[name][row] = value
    return keys, stats


def read(flows, at_ns: int, created: int = 0, size: int = 1024) -> TableRead:  # type: ignore[no-untyped-def]
    keys, stats = table(*flows)
    return TableRead(keys, stats, at_ns, size, created or len(keys))


WEB_TO_DB = (10, "172.20.0.2", "172.20.0.3", 6, 40000, 5432)
WEB_TO_OUT = (10, "172.20.0.2", "198.51.100.1", 17, 40001, 53)
DB_TO_HOST = (11, "172.20.0.3", "172.20.0.1", 1, 8, 0)


def test_first_read_is_a_baseline_then_deltas_follow() -> None:
    aggregator = FlowAggregator()
    first = aggregator.update(read([(*WEB_TO_DB, 1000, 10)], 1_000_000_000), INVENTORY)
    assert first.flows == []
    second = aggregator.update(
        read([(*WEB_TO_DB, 1500, 14), (*WEB_TO_OUT, 300, 3)], 3_000_000_000), INVENTORY
    )
    assert second.interval == 2.0
    by_dst = {f.key.dst: f for f in second.flows}
    assert (by_dst["172.20.0.3"].bytes_delta, by_dst["172.20.0.3"].packets_delta) == (500, 4)
    assert (by_dst["198.51.100.1"].bytes_delta, by_dst["198.51.100.1"].packets_delta) == (300, 3)
    assert [f.key.dst for f in second.flows] == ["172.20.0.3", "198.51.100.1"]  # busiest first
    web = next(s for s in second.stats if s.container is WEB)
    assert (web.bytes_total, web.bytes_delta, web.packets_delta, web.active_flows) == (1800, 800, 7, 2)
    assert web.rate_history == (400.0,)


def test_idle_flows_are_not_reported_but_count_in_totals() -> None:
    aggregator = FlowAggregator()
    aggregator.update(read([(*WEB_TO_DB, 1000, 10)], 0), INVENTORY)
    snapshot = aggregator.update(read([(*WEB_TO_DB, 1000, 10)], 1_000_000_000), INVENTORY)
    assert snapshot.flows == []
    web = next(s for s in snapshot.stats if s.container is WEB)
    assert (web.bytes_total, web.bytes_delta, web.active_flows) == (1000, 0, 0)


def test_destinations_are_classified() -> None:
    aggregator = FlowAggregator()
    aggregator.update(read([], 0), INVENTORY)
    flows = [
        (*WEB_TO_DB, 1, 1),
        (*WEB_TO_OUT, 1, 1),
        (*DB_TO_HOST, 1, 1),
        (11, "172.20.0.3", "224.0.0.251", 17, 5353, 5353, 1, 1),
        (11, "172.20.0.3", "255.255.255.255", 17, 68, 67, 1, 1),
        (11, "fd00::3", "ff02::1", 58, 135, 0, 1, 1),
    ]
    snapshot = aggregator.update(read(flows, 1_000_000_000), INVENTORY)
    kinds = {f.key.dst: (f.dst_kind, f.dst_name) for f in snapshot.flows}
    assert kinds == {
        "172.20.0.3": (DstKind.CONTAINER, "db"),
        "198.51.100.1": (DstKind.EXTERNAL, None),
        "172.20.0.1": (DstKind.HOST, "host"),
        "224.0.0.251": (DstKind.MULTICAST, None),
        "255.255.255.255": (DstKind.BROADCAST, None),
        "ff02::1": (DstKind.MULTICAST, None),
    }


def test_egress_by_kind_is_the_sum_of_the_flows_without_building_them() -> None:
    """/metrics reads each container's egress by (protocol, destination kind): summed in numpy
    it must equal the sum over the Flow objects, and need none of them built."""
    baseline = [(*WEB_TO_DB, 100, 1), (*WEB_TO_OUT, 100, 1)]
    moved = [
        (*WEB_TO_DB, 1100, 4),  # container, tcp: 1000 bytes, 3 packets
        (10, "172.20.0.2", "172.20.0.3", 6, 40002, 80, 50, 1),  # same container and kind: summed
        (*WEB_TO_OUT, 400, 3),  # external, udp: 300 bytes, 2 packets
        (10, "172.20.0.2", "198.51.100.2", 17, 40003, 53, 70, 1),  # another external destination
        (*DB_TO_HOST, 84, 1),
        (11, "fd00::3", "ff02::1", 58, 135, 0, 72, 1),
        (11, "172.20.0.3", "198.51.100.1", 6, 40004, 443, 0, 0),  # idle: in no sum
        (99, "10.0.0.9", "198.51.100.1", 17, 1, 2, 10, 1),  # no container's veth
    ]
    with_flows, without = FlowAggregator(), FlowAggregator(build_flows=False)
    for aggregator in (with_flows, without):
        aggregator.update(read(baseline, 0), INVENTORY)
    built = with_flows.update(read(moved, 10**9), INVENTORY)
    summed = without.update(read(moved, 10**9), INVENTORY)
    expected = {
        "web": {("tcp", "container"): (1050, 4), ("udp", "external"): (370, 3)},
        "db": {("icmp", "host"): (84, 1), ("icmpv6", "multicast"): (72, 1)},
    }
    for snapshot in (built, summed):
        assert {s.container.name: s.egress_by_kind() for s in snapshot.stats} == expected
    assert not summed.flows
    from_flows = {s.container.name: replace(s, egress=None).egress_by_kind() for s in built.stats}
    assert from_flows == expected


def test_unknown_veth_flows_are_unattributed_and_evictions_counted() -> None:
    aggregator = FlowAggregator()
    aggregator.update(read([], 0), INVENTORY)
    snapshot = aggregator.update(
        read([(99, "10.0.0.9", "10.0.0.1", 17, 1, 2, 10, 1)], 10**9, created=5), INVENTORY
    )
    assert [f.container for f in snapshot.unattributed_flows] == [None]
    assert (snapshot.table.used, snapshot.table.evicted) == (1, 4)
    assert [c.name for c in snapshot.unobservable] == ["agent"]


def test_counter_restart_after_eviction_is_not_negative() -> None:
    aggregator = FlowAggregator()
    aggregator.update(read([(*WEB_TO_OUT, 5000, 50)], 0), INVENTORY)
    snapshot = aggregator.update(read([(*WEB_TO_OUT, 200, 2)], 10**9), INVENTORY)
    assert (snapshot.flows[0].bytes_delta, snapshot.flows[0].packets_delta) == (200, 2)


def test_records_are_flat_and_valid() -> None:
    schema = json.loads((files("agent.schema") / "flow-record.v1.json").read_text())
    aggregator = FlowAggregator()
    aggregator.update(read([], 0), INVENTORY)
    snapshot = aggregator.update(read([(*WEB_TO_OUT, 300, 3), (*DB_TO_HOST, 84, 1)], 10**9), INVENTORY)
    records = [flow_record(f, snapshot) for f in snapshot.flows]
    for record in records:
        jsonschema.validate(record, schema)
    udp = next(r for r in records if r["proto"] == "udp")
    assert (udp["container_name"], udp["compose_service"], udp["src_port"], udp["dst_port"]) == (
        "web",
        "web",
        40001,
        53,
    )
    assert (udp["icmp_type"], udp["network"], udp["veth"]) == (None, "front", "vethweb")
    icmp = next(r for r in records if r["proto"] == "icmp")
    assert (icmp["src_port"], icmp["icmp_type"], icmp["icmp_code"]) == (None, 8, 0)


def test_ndjson_filter_by_container() -> None:
    import io

    aggregator = FlowAggregator()
    aggregator.update(read([], 0), INVENTORY)
    snapshot = aggregator.update(read([(*WEB_TO_OUT, 300, 3), (*DB_TO_HOST, 84, 1)], 10**9), INVENTORY)
    out = io.StringIO()
    assert write_ndjson(snapshot, out, {DB.id}) == 1
    flow_line = out.getvalue().splitlines()[0]  # then the container and interval records
    assert json.loads(flow_line)["container_name"] == "db"


def test_update_of_100k_flows_fits_the_budget() -> None:
    containers = tuple(
        Container(
            id=f"{n:064x}",
            name=f"c{n}",
            image="x",
            endpoints=(Endpoint(100 + n, f"v{n}", "net", "br", f"10.1.{n // 250}.{n % 250}"),),
        )
        for n in range(200)
    )
    inventory = Inventory(containers=containers)
    n_flows = 100_000
    keys = np.zeros(n_flows, FLOW_KEY_DTYPE)
    stats = np.zeros(n_flows, FLOW_STATS_DTYPE)
    keys["ifindex"] = 100 + np.arange(n_flows) % 200
    keys["family"] = 4
    keys["proto"] = 6
    keys["src_port"] = np.arange(n_flows) % 60000
    keys["dst_port"] = np.arange(n_flows) // 60000 + 1
    stats["bytes"] = 1000
    stats["packets"] = 10
    aggregator = FlowAggregator()
    aggregator.update(TableRead(keys, stats.copy(), 0, n_flows, n_flows), inventory)
    stats["bytes"][::10] += 500  # a tenth of the flows moved
    stats["packets"][::10] += 5
    started = time.perf_counter()
    snapshot = aggregator.update(TableRead(keys, stats, 10**9, n_flows, n_flows), inventory)
    elapsed = time.perf_counter() - started
    assert len(snapshot.flows) == n_flows // 10
    assert sum(s.bytes_delta for s in snapshot.stats) == 500 * n_flows // 10
    assert elapsed < 1.0, f"aggregating 100k flows took {elapsed:.3f}s"


def test_only_flows_seen_since_the_previous_read_started_are_diffed() -> None:
    """last_seen older than the previous read's start: the flow cannot have moved. A packet
    counted while the previous read ran (last_seen after its start) is still attributed."""
    aggregator = FlowAggregator()
    keys, stats = table((*WEB_TO_OUT, 100, 1), (*WEB_TO_DB, 100, 1))
    stats["last_seen_ns"] = 50
    aggregator.update(TableRead(keys, stats.copy(), 100, 1024, 2, read_started_ns=90), INVENTORY)
    stats["bytes"] += 60
    stats["packets"] += 1
    stats["last_seen_ns"][0] = 95  # counted during the previous read, after it started
    snapshot = aggregator.update(TableRead(keys, stats, 200, 1024, 2, read_started_ns=190), INVENTORY)
    assert [(f.key.dst, f.bytes_delta) for f in snapshot.flows] == [("198.51.100.1", 60)]


def test_a_churning_table_loses_no_interval_when_evicted_keys_are_forgotten() -> None:
    """Thousands of new flows every interval (the old ones evicted): the aggregator forgets
    evicted keys once they outnumber the table, and every interval's deltas stay exact."""
    per_interval, intervals = 3000, 6  # 18,000 keys seen: past the 8,192 the aggregator keeps
    steady_keys, steady_stats = table((*WEB_TO_DB, 0, 0))
    aggregator = FlowAggregator()
    aggregator.update(TableRead(steady_keys, steady_stats.copy(), 10**9, 4096, 1), INVENTORY)
    for number in range(1, intervals + 1):
        at_ns = (number + 1) * 10**9
        keys = np.zeros(per_interval, FLOW_KEY_DTYPE)
        stats = np.zeros(per_interval, FLOW_STATS_DTYPE)
        keys["ifindex"], keys["family"], keys["proto"] = 10, 4, 17
        keys["src_port"] = number * per_interval + np.arange(per_interval)  # all new this interval
        keys["dst_port"] = 53
        stats["bytes"], stats["packets"], stats["last_seen_ns"] = 100, 1, at_ns
        steady_stats["bytes"] += 1000
        steady_stats["packets"] += 10
        steady_stats["last_seen_ns"] = at_ns
        snapshot = aggregator.update(
            TableRead(
                np.concatenate([steady_keys, keys]),
                np.concatenate([steady_stats, stats]),
                at_ns,
                4096,
                1 + number * per_interval,
            ),
            INVENTORY,
        )
        web = next(s for s in snapshot.stats if s.container is WEB)
        assert (web.bytes_delta, web.packets_delta, web.active_flows) == (
            1000 + 100 * per_interval,
            10 + per_interval,
            1 + per_interval,
        ), f"interval {number}"
        assert len(snapshot.flows) == 1 + per_interval
        assert (snapshot.flows[0].key.dst, snapshot.flows[0].bytes_delta) == ("172.20.0.3", 1000)
