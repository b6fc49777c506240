"""agent/veth_owner.py's two kernel reads, against netns of this test's own: which netns an
nsid names (RTM_GETNSID by fd) and the peer's MAC there (RTM_GETLINK). Needs root, not Docker."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import pytest
from netns_pair import B0_MAC, ip, netns_pair

from agent.veth_owner import SandboxNetns, _mac_in

pytestmark = pytest.mark.system
NETNS_DIR = Path("/run/netns")  # where `ip netns add` puts them, as Docker does under /var/run/docker/netns


def test_the_peers_nsid_names_its_netns_and_gives_its_mac() -> None:
    with netns_pair() as pair:
        listed = re.search(r"nsid (\d+)", ip("-n", pair.a, "netns", "list-id"))
        assert listed is not None
        peer_id = int(listed.group(1))
        sandboxes = SandboxNetns(NETNS_DIR)
        assert pair.run_in(pair.a, lambda: sandboxes.path(peer_id)) == NETNS_DIR / pair.b
        assert pair.run_in(pair.a, lambda: sandboxes.path(peer_id + 1000)) is None  # no netns has that id
        b0_index = pair.run_in(pair.b, lambda: socket.if_nametoindex("b0"))
        assert _mac_in(NETNS_DIR / pair.b, b0_index) == B0_MAC
