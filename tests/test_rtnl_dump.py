"""agent/rtnl's reads against the kernel: a veth pair between two netns of this test's own,
read by the raw dumps and requests and checked against what `ip` set up. Needs root, not Docker."""

from __future__ import annotations

import errno
import os
import re
import socket
from collections.abc import Iterator

import pytest
from netns_pair import A0_MAC, ADDRESS_V4, ADDRESS_V6, B0_MAC, NetnsPair, ip, netns_pair

from agent.datapath.attach import TC_INGRESS_PARENT
from agent.rtnl import Link, RtnlSocket

pytestmark = pytest.mark.system  # root: it creates two netns of its own


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as made:
        yield made


def read(pair: NetnsPair, netns: str) -> tuple[list[Link], set[str], dict[str, int]]:
    def dump() -> tuple[list[Link], set[str], dict[str, int]]:
        with RtnlSocket() as rtnl:
            return rtnl.links(), rtnl.addresses(), dict((n, i) for i, n in socket.if_nameindex())

    return pair.run_in(netns, dump)


def test_links_name_mac_kind_and_the_peer_in_the_other_netns(pair: NetnsPair) -> None:
    links_a, _, index_a = read(pair, pair.a)
    links_b, _, index_b = read(pair, pair.b)
    a0 = next(link for link in links_a if link.name == "a0")
    assert a0.index == index_a["a0"] and a0.mac == A0_MAC and a0.kind == "veth"
    assert a0.peer_in_other_netns and a0.peer_index == index_b["b0"] and a0.master == 0
    listed_id = re.search(r"nsid (\d+)", ip("-n", pair.a, "netns", "list-id"))
    assert listed_id is not None and a0.peer_netnsid == int(listed_id.group(1))
    lo = next(link for link in links_a if link.name == "lo")
    assert not lo.peer_in_other_netns and lo.peer_netnsid is None and lo.peer_index == 0 and lo.kind == ""
    assert {link.name for link in links_b} == {"lo", "b0"}


def test_addresses_both_families(pair: NetnsPair) -> None:
    _, addresses, _ = read(pair, pair.a)
    assert {ADDRESS_V4, ADDRESS_V6} <= addresses
    assert ADDRESS_V4 not in read(pair, pair.b)[1]


def test_a_link_without_clsact_and_a_missing_link_list_no_filters(pair: NetnsPair) -> None:
    def filters() -> tuple[list[object], list[object]]:
        with RtnlSocket() as rtnl:
            return (
                rtnl.filters(socket.if_nametoindex("a0"), TC_INGRESS_PARENT),
                rtnl.filters(999_999, TC_INGRESS_PARENT),  # the kernel answers an empty dump
            )

    assert pair.run_in(pair.a, filters) == ([], [])


def test_one_link_by_index_and_a_missing_one_is_enodev(pair: NetnsPair) -> None:
    def link_b0() -> Link:
        with RtnlSocket() as rtnl:
            return rtnl.link(socket.if_nametoindex("b0"))

    b0 = pair.run_in(pair.b, link_b0)
    assert (b0.name, b0.mac, b0.kind) == ("b0", B0_MAC, "veth")

    def missing() -> None:
        with RtnlSocket() as rtnl:
            rtnl.link(999_999)

    with pytest.raises(OSError) as refused:
        pair.run_in(pair.b, missing)
    assert refused.value.errno == errno.ENODEV


def test_netnsid_of_the_peer_netns_an_unrelated_one_and_not_a_netns(pair: NetnsPair) -> None:
    """a gave b an id when the veth pair was made; a netns with no link to a has none."""
    unrelated = f"{pair.a}-c"
    ip("netns", "add", unrelated)
    try:

        def ids() -> tuple[int | None, int | None]:
            fds = [os.open(f"/run/netns/{name}", os.O_RDONLY) for name in (pair.b, unrelated)]
            try:
                with RtnlSocket() as rtnl:
                    return rtnl.netnsid(fds[0]), rtnl.netnsid(fds[1])
            finally:
                for fd in fds:
                    os.close(fd)

        peer_id, unrelated_id = pair.run_in(pair.a, ids)
        listed = re.search(r"nsid (\d+)", ip("-n", pair.a, "netns", "list-id"))
        assert listed is not None and peer_id == int(listed.group(1)) and unrelated_id is None
    finally:
        ip("netns", "del", unrelated)

    def of_a_file() -> int | None:
        fd = os.open("/proc/self/stat", os.O_RDONLY)
        try:
            with RtnlSocket() as rtnl:
                return rtnl.netnsid(fd)
        finally:
            os.close(fd)

    with pytest.raises(OSError) as refused:
        pair.run_in(pair.a, of_a_file)
    assert refused.value.errno == errno.EINVAL
