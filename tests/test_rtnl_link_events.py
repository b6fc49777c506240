"""agent/rtnl/link_events.py against the kernel: what a Docker start does to a veth
(made, enslaved to a bridge, its peer moved into another netns), then its removal, in a
netns of this test's own, as the subscription reports it. Needs root, not Docker."""

from __future__ import annotations

import errno
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from netns_pair import NetnsPair, ip, netns_pair

from agent.inventory_watch import LINK_EVENTS_RCVBUF
from agent.rtnl import Link, LinkEvents

pytestmark = pytest.mark.system


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as made:
        yield made


def events_until(
    events: LinkEvents, done: Callable[[list[tuple[Link, bool]]], bool], timeout: float = 5
) -> list[tuple[Link, bool]]:
    seen: list[tuple[Link, bool]] = []
    deadline = time.monotonic() + timeout
    while not done(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"not seen in {timeout} s: {seen}"
        if select.select([events], [], [], left)[0]:
            seen.extend(events.read())
    return seen


def test_a_veth_made_enslaved_moved_and_deleted(pair: NetnsPair) -> None:
    events = pair.run_in(pair.a, lambda: LinkEvents(LINK_EVENTS_RCVBUF))  # the socket stays in netns a
    try:
        ip("-n", pair.a, "link", "add", "ettbr", "type", "bridge")
        ip("-n", pair.a, "link", "add", "v0", "type", "veth", "peer", "v1")
        ip("-n", pair.a, "link", "set", "v0", "master", "ettbr", "up")
        ip("-n", pair.a, "link", "set", "v1", "netns", pair.b)
        ip("-n", pair.b, "link", "set", "v1", "up")  # v0's carrier comes up: reported with its new peer
        bridge_index = pair.run_in(pair.a, lambda: socket.if_nametoindex("ettbr"))
        v1_index = pair.run_in(pair.b, lambda: socket.if_nametoindex("v1"))
        b_id = re.search(r"nsid (\d+)", ip("-n", pair.a, "netns", "list-id"))
        assert b_id is not None
        ip("-n", pair.a, "link", "del", "v0")
        seen = events_until(
            events,
            lambda seen: any(link.name == "v0" and link.kind == "veth" and removed for link, removed in seen),
        )
    finally:
        events.close()

    # The bridge reports its ports too (family AF_BRIDGE, no IFLA_LINKINFO: kind "")
    v0 = [(link, removed) for link, removed in seen if link.name == "v0" and link.kind == "veth"]
    assert v0[0][0].master == 0 and not v0[0][1]  # made, not yet enslaved
    enslaved = [link for link, removed in v0 if link.master == bridge_index and not removed]
    assert enslaved, v0
    moved = [link for link in enslaved if link.peer_netnsid is not None]
    assert moved and moved[-1].peer_netnsid == int(b_id.group(1)) and moved[-1].peer_index == v1_index
    assert v0[-1][1] and sum(removed for _, removed in v0) == 1
    # v1 left netns a: a's subscription hears it go
    assert any(link.name == "v1" and removed and link.kind == "veth" for link, removed in seen)
    assert any(link.name == "ettbr" and link.kind == "bridge" and not removed for link, removed in seen)


def test_the_receive_buffer_passes_rmem_max_and_an_overflow_is_enobufs(pair: NetnsPair) -> None:
    beyond_cap = 2 * int(Path("/proc/sys/net/core/rmem_max").read_text())  # SO_RCVBUF alone would stop there
    with (
        pair.run_in(pair.a, lambda: LinkEvents(beyond_cap)) as big,
        socket.fromfd(big.fileno(), socket.AF_NETLINK, socket.SOCK_RAW) as view,
    ):
        assert view.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) == 2 * beyond_cap  # the kernel doubles it
    with pair.run_in(pair.a, lambda: LinkEvents(1)) as small:  # the kernel's minimum: a few messages
        for number in range(20):
            ip("-n", pair.a, "link", "add", f"o{number}", "type", "veth", "peer", f"p{number}")
        with pytest.raises(OSError) as overflow:
            for _ in range(200):  # what fitted comes first, then the error; bounded
                assert select.select([small], [], [], 5)[0], "no ENOBUFS after 20 veth pairs"
                small.read()
        assert overflow.value.errno == errno.ENOBUFS
