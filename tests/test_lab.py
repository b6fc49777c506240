"""The lab itself: the upstream counts exactly what reaches it, containers reach it."""

from __future__ import annotations

import subprocess

from lab import PYTHON, SAFETY_PREFIXES, UPSTREAM_V4, UPSTREAM_V4_OTHER, UPSTREAM_V6, Lab, sh, wait_until


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
    lab.send_udp(container, UPSTREAM_V4, 4001, count=12, size=33)
    assert sink.wait_for(12, timeout=5) == (12, 12 * 33)


_RECEIVE_ONE = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(10)
s.bind((sys.argv[1], int(sys.argv[2])))
print("ready", flush=True)
_, (address, port) = s.recvfrom(65535)
print(address, port)
"""


def test_udp_sender_reports_the_port_it_sent_from(lab: Lab) -> None:
    """Tests key flows by the source port send_udp returns: it is the one on the wire
    (container to container, so no NAT is in between)."""
    net = lab.network()
    sender, receiving = lab.container("lab", network=net), lab.container("labrecv", network=net)
    receiver = subprocess.Popen(
        [
            "nsenter",
            f"--net=/proc/{lab.pid(receiving)}/ns/net",
            PYTHON,
            "-c",
            _RECEIVE_ONE,
            lab.ip(receiving),
            "4005",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert receiver.stdout is not None and receiver.stdout.readline() == "ready\n"
        src_port = lab.send_udp(sender, lab.ip(receiving), 4005, count=1, size=5)  # an ephemeral port
        out, _ = receiver.communicate(timeout=10)
    finally:
        receiver.kill()
        receiver.wait()
    assert out.split() == [lab.ip(sender), str(src_port)]


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
