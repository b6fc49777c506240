"""Two netns of a test's own with a veth pair between them, removed even on failure.

Netns a holds a0 (MAC A0_MAC, ADDRESS_V4 and ADDRESS_V6), netns b holds b0 (MAC B0_MAC,
PEER_V4). IPv6 is off in b and both sides know each other's MAC: nothing but what a
test sends crosses the pair, so a count of packets on a0's ingress is exact.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

from agent.inventory import in_netns

A0_MAC, B0_MAC = "02:00:00:00:00:a0", "02:00:00:00:00:b0"
ADDRESS_V4, ADDRESS_V6, PEER_V4 = "198.51.100.77", "2001:db8:100::77", "198.51.100.78"
T = TypeVar("T")


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30).stdout


@dataclass(frozen=True)
class NetnsPair:
    a: str
    b: str

    def run_in(self, netns: str, fn: Callable[[], T]) -> T:
        result: T = in_netns(f"/run/netns/{netns}", fn)
        return result


@contextlib.contextmanager
def netns_pair() -> Iterator[NetnsPair]:
    tag = f"ett-nl-{os.getpid() % 10000}-{os.urandom(2).hex()}"
    pair = NetnsPair(f"{tag}-a", f"{tag}-b")
    try:
        for name in (pair.a, pair.b):
            ip("netns", "add", name)
        subprocess.run(
            ["ip", "netns", "exec", pair.b, "sysctl", "-qw", "net.ipv6.conf.default.disable_ipv6=1"],
            check=True,
            capture_output=True,
            timeout=30,
        )
        ip(
            "-n",
            pair.a,
            "link",
            "add",
            "a0",
            "address",
            A0_MAC,
            "type",
            "veth",
            "peer",
            "b0",
            "netns",
            pair.b,
        )
        ip("-n", pair.b, "link", "set", "b0", "address", B0_MAC)
        ip("-n", pair.a, "addr", "add", f"{ADDRESS_V4}/24", "dev", "a0")
        ip("-n", pair.a, "addr", "add", f"{ADDRESS_V6}/64", "dev", "a0", "nodad")
        ip("-n", pair.b, "addr", "add", f"{PEER_V4}/24", "dev", "b0")
        ip("-n", pair.a, "neigh", "add", PEER_V4, "lladdr", B0_MAC, "dev", "a0", "nud", "permanent")
        ip("-n", pair.b, "neigh", "add", ADDRESS_V4, "lladdr", A0_MAC, "dev", "b0", "nud", "permanent")
        for netns, link in ((pair.a, "a0"), (pair.b, "b0")):
            ip("-n", netns, "link", "set", link, "up")
        yield pair
    finally:
        for name in (pair.a, pair.b):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=30)
