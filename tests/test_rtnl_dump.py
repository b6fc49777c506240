"""agent/rtnl_dump.py against the kernel: a veth pair between two netns of this test's own,
read by the raw dumps and checked against what `ip` set up. Needs root, not Docker."""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterator

import pytest

from agent.datapath.attach import TC_INGRESS_PARENT
from agent.inventory import in_netns
from agent.rtnl_dump import Link, RtnlSocket

TAG = f"ettrt{os.getpid() % 10000}"
ADDRESS_V4, ADDRESS_V6 = "198.51.100.77", "2001:db8:100::77"
pytestmark = pytest.mark.system  # root: it creates two netns of its own


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def two_netns() -> Iterator[tuple[str, str]]:
    """Netns a and b, a veth a0 <-> b0 between them, a0 with a MAC and two addresses."""
    names = (f"{TAG}-a", f"{TAG}-b")
    try:
        for name in names:
            ip("netns", "add", name)
        ip(
            "-n",
            names[0],
            "link",
            "add",
            "a0",
            "address",
            "02:00:00:00:00:a0",
            "type",
            "veth",
            "peer",
            "b0",
            "netns",
            names[1],
        )
        ip("-n", names[0], "addr", "add", f"{ADDRESS_V4}/24", "dev", "a0")
        ip("-n", names[0], "addr", "add", f"{ADDRESS_V6}/64", "dev", "a0", "nodad")
        yield names
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)


def read(netns: str) -> tuple[list[Link], set[str], dict[str, int]]:
    def dump() -> tuple[list[Link], set[str], dict[str, int]]:
        with RtnlSocket() as rtnl:
            return rtnl.links(), rtnl.addresses(), dict((n, i) for i, n in socket.if_nameindex())

    return in_netns(f"/run/netns/{netns}", dump)


def test_links_name_mac_kind_and_the_peer_in_the_other_netns(two_netns: tuple[str, str]) -> None:
    links_a, _, index_a = read(two_netns[0])
    links_b, _, index_b = read(two_netns[1])
    a0 = next(link for link in links_a if link.name == "a0")
    assert a0.index == index_a["a0"] and a0.mac == "02:00:00:00:00:a0" and a0.kind == "veth"
    assert a0.peer_in_other_netns and a0.peer_index == index_b["b0"] and a0.master == 0
    lo = next(link for link in links_a if link.name == "lo")
    assert not lo.peer_in_other_netns and lo.peer_index == 0 and lo.kind == ""
    assert {link.name for link in links_b} == {"lo", "b0"}


def test_addresses_both_families(two_netns: tuple[str, str]) -> None:
    _, addresses, _ = read(two_netns[0])
    assert {ADDRESS_V4, ADDRESS_V6} <= addresses
    assert ADDRESS_V4 not in read(two_netns[1])[1]


def test_a_link_without_clsact_and_a_missing_link_list_no_filters(two_netns: tuple[str, str]) -> None:
    def filters() -> tuple[list[object], list[object]]:
        with RtnlSocket() as rtnl:
            return (
                rtnl.filters(socket.if_nametoindex("a0"), TC_INGRESS_PARENT),
                rtnl.filters(999_999, TC_INGRESS_PARENT),  # the kernel answers an empty dump
            )

    assert in_netns(f"/run/netns/{two_netns[0]}", filters) == ([], [])
