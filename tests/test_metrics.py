"""Snapshot -> Prometheus text, on fixed Snapshots (pure: no kernel, no Docker). Every scrape
here is checked against prometheus_client, the oracle (tests/metrics_oracle.py): it renders
the same families itself and both texts must say the same."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from metrics_oracle import assert_same_as_prometheus_client, oracle_text
from prometheus_client.parser import text_string_to_metric_families

from agent.agent_status import AgentStatus
from agent.datapath import IfindexCounters, RuleHits
from agent.errors import UserError
from agent.latency import LatencyHistogram
from agent.metrics import AgentHealth, SnapshotMetrics, parse_listen
from agent.metrics_text import render
from agent.model import (
    Container,
    ContainerStats,
    DstKind,
    Endpoint,
    Flow,
    FlowCounters,
    FlowKey,
    IntervalLosses,
    Snapshot,
    TableFill,
)
from agent.policy import Rule

WEB = Container(
    id="a" * 64,
    name="shop-web-1",
    image="img:1",
    compose_project="shop",
    compose_service="web",
    endpoints=(Endpoint(10, "veth10", "shop_default", "br-x", "172.20.0.2"),),
)
DB = Container(
    id="b" * 64, name="db", image="img:1", endpoints=(Endpoint(11, "veth11", "net", "br-x", "172.20.0.3"),)
)


def flow(owner: Container, dst: str, dport: int, proto: int, kind: DstKind, sent: int, packets: int) -> Flow:
    return Flow(
        key=FlowKey(owner.endpoints[0].ifindex, 4, proto, owner.addresses[0], dst, 40000, dport),
        counters=FlowCounters(bytes=sent, packets=packets, first_seen_ns=0, last_seen_ns=0),
        container=owner,
        bytes_delta=sent,
        packets_delta=packets,
        dropped_packets_delta=0,
        first_seen=0.0,
        last_seen=0.0,
        dst_kind=kind,
    )


NO_LOSSES = IntervalLosses()


def snapshot(*stats: ContainerStats, evicted: int = 0, losses: IntervalLosses = NO_LOSSES) -> Snapshot:
    return Snapshot(
        time=0.0,
        interval=1.0,
        stats=stats,
        unobservable=(),
        table=TableFill(used=3, size=1024, evicted=evicted),
        losses=losses,
    )


def status(**extra) -> AgentStatus:  # type: ignore[no-untyped-def]
    fields = {
        "pid": 1,
        "started_at": 0.0,
        "updated_at": 0.0,
        "attached_veths": 2,
        "rules": 0,
        "rules_enforced": 0,
    }
    return AgentStatus(**(fields | extra))


def block_rule(rule_id: int, container: str, action: str = "block") -> Rule:
    return Rule(
        rule_id=rule_id,
        container=container,
        dest="198.51.100.0/24",
        dest_kind="cidr",
        port=None,
        proto="any",
        action=action,  # type: ignore[arg-type]
        added_at="2026-01-01T00:00:00Z",
        addresses=("198.51.100.0/24",),
    )


def health(rule_hits=(), **status_fields) -> AgentHealth:  # type: ignore[no-untyped-def]
    return AgentHealth(status(**status_fields), LatencyHistogram().read(), lambda: rule_hits)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def scrape(metrics: SnapshotMetrics) -> str:
    families = metrics.collect()
    text = render(families)
    assert_same_as_prometheus_client(text, oracle_text(families))
    return text


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def web_labels(**extra: str) -> frozenset[tuple[str, str]]:
    return frozenset(
        {"container": "shop-web-1", "compose_project": "shop", "compose_service": "web", **extra}.items()
    )


def test_deltas_of_each_interval_add_up_to_exact_counters_by_proto_and_kind() -> None:
    metrics = SnapshotMetrics()
    first = ContainerStats(
        WEB,
        active_flows=3,
        overflow_packets_delta=4,
        flows=[
            flow(WEB, "198.51.100.7", 443, 6, DstKind.EXTERNAL, 3000, 3),
            flow(WEB, "198.51.100.8", 443, 6, DstKind.EXTERNAL, 500, 1),
            flow(WEB, "172.20.0.3", 5432, 17, DstKind.CONTAINER, 120, 2),
        ],
    )
    metrics.update(snapshot(first, ContainerStats(DB)), health())
    # the next interval: one flow moved again, and its table counter restarted (evicted and
    # re-created), so only the delta says what was sent; the counter must still grow
    second = ContainerStats(
        WEB,
        active_flows=1,
        overflow_packets_delta=2,
        flows=[flow(WEB, "198.51.100.7", 443, 6, DstKind.EXTERNAL, 40, 1)],
    )
    metrics.update(snapshot(second, ContainerStats(DB)), health())
    got = samples(scrape(metrics))

    assert (
        got[("egress_top_container_egress_bytes_total", web_labels(proto="tcp", dst_kind="external"))] == 3540
    )
    assert (
        got[("egress_top_container_egress_packets_total", web_labels(proto="tcp", dst_kind="external"))] == 5
    )
    assert (
        got[("egress_top_container_egress_bytes_total", web_labels(proto="udp", dst_kind="container"))] == 120
    )
    assert got[("egress_top_container_active_flows", web_labels())] == 1
    assert got[("egress_top_container_overflow_packets_total", web_labels())] == 6
    db = frozenset({"container": "db", "compose_project": "", "compose_service": ""}.items())
    assert got[("egress_top_container_active_flows", db)] == 0
    # a container that sent nothing has no egress series yet rather than zeros per proto/kind
    egress_series = [labels for name, labels in got if name == "egress_top_container_egress_bytes_total"]
    assert len(egress_series) == 2


def test_no_label_ever_carries_a_destination_address_port_or_name() -> None:
    metrics = SnapshotMetrics()
    stats = ContainerStats(WEB, flows=[flow(WEB, "198.51.100.7", 443, 6, DstKind.EXTERNAL, 100, 1)])
    metrics.update(snapshot(stats), health())
    values = {value for _name, labels in samples(scrape(metrics)) for _key, value in labels}
    assert "198.51.100.7" not in values and "443" not in values
    assert values >= {"shop-web-1", "shop", "web", "tcp", "external"}  # the labels are there at all


def test_removed_container_series_vanish_after_the_grace_and_come_back_as_new() -> None:
    clock = Clock()
    metrics = SnapshotMetrics(grace_seconds=5, clock=clock)
    stats = ContainerStats(WEB, flows=[flow(WEB, "198.51.100.7", 443, 6, DstKind.EXTERNAL, 100, 1)])
    metrics.update(snapshot(stats, ContainerStats(DB)), health())
    metrics.update(snapshot(ContainerStats(DB)), health())  # WEB removed
    clock.now += 4.9
    assert "shop-web-1" in scrape(metrics)  # within the grace: still scraped, counter unchanged
    clock.now += 0.1
    text = scrape(metrics)  # pruned at scrape time, no further Snapshot needed
    assert "shop-web-1" not in text
    assert 'container="db"' in text


def test_drops_come_from_block_rules_of_known_containers_only() -> None:
    metrics = SnapshotMetrics()
    hits = [
        (block_rule(7, "shop-web-1"), RuleHits(packets=4, bytes=400, last_hit_ns=1)),
        (block_rule(8, "shop-web-1", action="allow"), RuleHits(packets=9, bytes=900, last_hit_ns=1)),
        (block_rule(9, "not-running"), RuleHits(packets=0, bytes=0, last_hit_ns=0)),
    ]
    metrics.update(snapshot(ContainerStats(WEB)), health(hits, rules=3))
    got = samples(scrape(metrics))
    drops = {(name, labels): value for (name, labels), value in got.items() if "dropped" in name}
    assert drops == {
        ("egress_top_container_dropped_packets_total", web_labels(rule_id="7")): 4,
        ("egress_top_container_dropped_bytes_total", web_labels(rule_id="7")): 400,
    }
    assert got[("egress_top_rules", frozenset())] == 3


def veth_drops(held: int = 0, unparsed: int = 0) -> IfindexCounters:
    """A veth's counters with only the drops no rule decided set (bytes: 100 a packet)."""
    return IfindexCounters(
        non_ip_packets=0,
        non_ip_bytes=0,
        dropped_packets=0,
        dropped_bytes=0,
        unparsed_packets=unparsed,
        unparsed_bytes=unparsed * 100,
        unparsed_dropped_packets=unparsed,
        unparsed_dropped_bytes=unparsed * 100,
        held_packets=held,
        held_bytes=held * 100,
    )


def test_held_and_unparsed_drops_count_from_the_first_interval_and_never_go_back() -> None:
    veths = {10: veth_drops(held=2, unparsed=1), 99: veth_drops(held=5)}  # before the agent's start
    agent = AgentHealth(status(), LatencyHistogram().read(), read_veth_counters=lambda: dict(veths))
    metrics = SnapshotMetrics()
    metrics.update(snapshot(ContainerStats(WEB), ContainerStats(DB)), agent)  # the baseline
    got = samples(scrape(metrics))
    assert got[("egress_top_unknown_veth_held_packets_total", frozenset())] == 0
    assert not [name for name, _labels in got if "unparsed" in name]  # no drop yet: no series
    # veth 10 (WEB's) drops 3 more unparsed; 99 (nobody's) holds 4 more; 12 is a new veth
    # that held 6 before its owner was known; DB's veth 11 counts nothing
    veths |= {10: veth_drops(held=2, unparsed=4), 99: veth_drops(held=9), 12: veth_drops(held=6)}
    got = samples(scrape(metrics))
    assert got[("egress_top_unknown_veth_held_packets_total", frozenset())] == 4 + 6
    assert got[("egress_top_unknown_veth_held_bytes_total", frozenset())] == (4 + 6) * 100
    unparsed = {(name, labels): value for (name, labels), value in got.items() if "unparsed" in name}
    assert unparsed == {
        ("egress_top_container_unparsed_dropped_packets_total", web_labels()): 3,
        ("egress_top_container_unparsed_dropped_bytes_total", web_labels()): 300,
    }
    # veth 99 went and its ifindex came back as a new veth that held 1: a counter that fell
    # is a new one, counted whole; the totals never go backwards
    veths |= {99: veth_drops(held=1)}
    got = samples(scrape(metrics))
    assert got[("egress_top_unknown_veth_held_packets_total", frozenset())] == 4 + 6 + 1
    assert got[("egress_top_container_unparsed_dropped_packets_total", web_labels())] == 3


def test_health_series() -> None:
    latency = LatencyHistogram(bounds=(0.001, 0.01))
    for seconds in (0.0005, 0.001, 0.004, 3.0):
        latency.observe(seconds)
    metrics = SnapshotMetrics()
    agent = status(
        refresh_retries=4, refresh_failures=1, containers_enforced=["a", "b"], not_enforced={"c": "why"}
    )
    first_losses = IntervalLosses(moved_lost=2, restarted_flows=1)
    metrics.update(snapshot(evicted=12, losses=first_losses), AgentHealth(agent, latency.read()))
    # evictions never go backwards; per-interval losses add up
    metrics.update(
        snapshot(evicted=10, losses=IntervalLosses(moved_lost=3)), AgentHealth(agent, latency.read())
    )
    got = samples(scrape(metrics))
    expected = {
        ("egress_top_attach_latency_seconds_bucket", frozenset({("le", "0.001")})): 2,  # le is inclusive
        ("egress_top_attach_latency_seconds_bucket", frozenset({("le", "0.01")})): 3,
        ("egress_top_attach_latency_seconds_bucket", frozenset({("le", "+Inf")})): 4,
        ("egress_top_attach_latency_seconds_count", frozenset()): 4,
        ("egress_top_inventory_refresh_retries_total", frozenset()): 4,
        ("egress_top_inventory_refresh_failures_total", frozenset()): 1,
        ("egress_top_flow_table_used", frozenset()): 3,
        ("egress_top_flow_table_size", frozenset()): 1024,
        ("egress_top_flow_table_evictions_total", frozenset()): 12,
        ("egress_top_moved_events_lost_total", frozenset()): 5,
        ("egress_top_flows_restarted_total", frozenset()): 1,
        ("egress_top_containers_enforced", frozenset()): 2,
        ("egress_top_containers_not_enforced", frozenset()): 1,
    }
    assert {key: got[key] for key in expected} == expected
    assert got[("egress_top_attach_latency_seconds_sum", frozenset())] == pytest.approx(3.0055)


def test_nothing_is_scraped_before_the_first_snapshot() -> None:
    assert scrape(SnapshotMetrics()) == ""


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool: Debian package prometheus")
def test_promtool_accepts_the_text() -> None:
    metrics = SnapshotMetrics()
    stats = ContainerStats(WEB, flows=[flow(WEB, "198.51.100.7", 443, 6, DstKind.EXTERNAL, 100, 1)])
    hits = [(block_rule(7, "shop-web-1"), RuleHits(packets=4, bytes=400, last_hit_ns=1))]
    latency = LatencyHistogram()
    latency.observe(0.002)
    veths = {10: veth_drops(held=1, unparsed=2)}
    agent = AgentHealth(status(), latency.read(), lambda: hits, lambda: veths)
    metrics.update(snapshot(stats, ContainerStats(DB)), agent)
    veths = {10: veth_drops(held=3, unparsed=5)}  # series of both kinds, not only zeros
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=scrape(metrics), capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == ""  # no lint warnings either


@pytest.mark.parametrize(
    ("text", "expected"),
    [("127.0.0.1:9847", ("127.0.0.1", 9847)), ("[::1]:9000", ("::1", 9000)), ("off", None)],
)
def test_listen_address(text: str, expected: tuple[str, int] | None) -> None:
    assert parse_listen(text) == expected


@pytest.mark.parametrize("text", ["9847", "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", ":9847", "on"])
def test_bad_listen_address_says_what_to_give(text: str) -> None:
    with pytest.raises(UserError, match="give ADDR:PORT"):
        parse_listen(text)
