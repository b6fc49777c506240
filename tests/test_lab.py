"""The lab itself: the upstream counts exactly what reaches it, containers reach it."""

from __future__ import annotations

from lab import SAFETY_PREFIXES, UPSTREAM_V4, UPSTREAM_V4_OTHER, UPSTREAM_V6, Lab, sh, wait_until


def test_safety_routes_are_in_place(upstream) -> None:
    v4 = sh("ip", "-4", "route", "show", "table", "main").stdout.splitlines()
    v6 = sh("ip", "-6", "route", "show", "table", "main").stdout.splitlines()
    for prefix in SAFETY_PREFIXES:
        routes = v6 if ":" in prefix else v4
        assert any(
            line.split()[:2] == ["unreachable", prefix] and "metric 4242" in line for line in routes
        ), prefix
    # the machine's own prefixes are never touched
    assert not [
        line for line in v4 if line.startswith("unreachable") and ("192.0.2." in line or "203.0.113." in line)
    ]


def test_udp_sink_counts_exactly(lab: Lab, upstream) -> None:
    sink = upstream.udp_sink(4001)
    container = lab.container("lab", network=lab.network())
    src_port = lab.send_udp(container, UPSTREAM_V4, 4001, count=12, size=33)
    assert src_port > 0
    assert sink.wait_for(12, timeout=5) == (12, 12 * 33)


def test_tcp_sink_and_connect(lab: Lab, upstream) -> None:
    sink = upstream.tcp_sink(4002)
    container = lab.container("lab", network=lab.network())
    assert lab.tcp_connect(container, UPSTREAM_V4_OTHER, 4002, payload=100)
    # the connection is counted on accept, its bytes a moment later
    wait_until(lambda: sink.counts() == (1, 100), timeout=5)
    assert not lab.tcp_connect(container, UPSTREAM_V4_OTHER, 4003, timeout=1)  # nothing listens


def test_ipv6_reaches_upstream(lab: Lab, upstream) -> None:
    sink = upstream.udp_sink(4004, address="::")
    container = lab.container("lab6", network=lab.network(ipv6=True))
    assert lab.ip6(container).startswith("fd00:e7:")
    lab.send_udp(container, UPSTREAM_V6, 4004, count=3, size=10)
    assert sink.wait_for(3, timeout=5) == (3, 30)


def test_containers_are_removed(lab: Lab, docker_client) -> None:
    container = lab.container("gone", network=lab.network())
    lab.destroy()
    names = [c.name for c in docker_client.containers.list(all=True)]
    assert container.name not in names
