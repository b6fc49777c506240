"""Whose is a new veth: found at link time, without waiting for the starting container.

What Docker 20.10 does when a container starts (seen on this machine, netlink and
events side by side): libnetwork creates the veth pair, enslaves the host end to the
bridge, then moves the peer into the sandbox netns (/var/run/docker/netns/<id>) and
gives it the endpoint's MAC; the container's process runs 20-80 ms later. From that
move on, the host end carries IFLA_LINK_NETNSID and IFLA_LINK (the peer's ifindex in
the sandbox). `docker network inspect` lists the endpoint (container name, MAC) from
libnetwork's store without the container's lock, while `docker inspect` of the
starting container waits for that lock until the start is over. So: nsid -> sandbox
netns -> peer MAC -> the endpoint of that MAC on the bridge's network -> its name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from agent.docker_api import EngineClient
from agent.inventory import bridge_name, in_netns
from agent.inventory_watch import LinkEvent
from agent.retry import RetryStats
from agent.rtnl import RtnlSocket

log = logging.getLogger(__name__)

DOCKER_NETNS_DIR = Path("/var/run/docker/netns")
# libnetwork stores the endpoint right after the driver made the veth: a few ms.
# The MAC may still be the random one of creation when the move is reported: poll finely
# at first (a start's budget is tens of ms), then back off.
OWNER_WAIT_SECONDS = 2.0
FIRST_DELAY_SECONDS = 0.001
MAX_DELAY_SECONDS = 0.05


class SandboxNetns:
    """nsid -> path of a Docker sandbox netns. The kernel reuses an nsid once its netns
    is gone (a restart did, here), so a cached path is checked again before use."""

    def __init__(self, netns_dir: Path = DOCKER_NETNS_DIR):
        self._dir = netns_dir
        self._paths: dict[int, Path] = {}
        self._lock = threading.Lock()

    def path(self, nsid: int) -> Path | None:
        with self._lock, RtnlSocket() as rtnl:
            cached = self._paths.get(nsid)
            if cached is not None and _nsid_of(rtnl, cached) == nsid:
                return cached
            entries = sorted(self._dir.iterdir()) if self._dir.is_dir() else []
            self._paths = {n: entry for entry in entries if (n := _nsid_of(rtnl, entry)) is not None}
            return self._paths.get(nsid)


def _nsid_of(rtnl: RtnlSocket, path: Path) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        return rtnl.netnsid(fd)
    except OSError:  # not a netns (yet), or gone
        return None
    finally:
        os.close(fd)


def _mac_in(netns: Path, ifindex: int) -> str:
    def read() -> str:
        with RtnlSocket() as rtnl:
            return rtnl.link(ifindex).mac

    return in_netns(str(netns), read)


class VethOwners:
    """Container name of a veth's endpoint, from the bridge's network as libnetwork sees it."""

    def __init__(self, client: EngineClient, stats: RetryStats):
        self._api = client.api
        self._stats = stats
        self._netns = SandboxNetns()
        self._networks: dict[str, str] = {}  # bridge name -> network id
        self._networks_lock = threading.Lock()

    def is_docker_bridge(self, bridge: str) -> bool:
        """For a bridge the last inventory refresh did not know: a network made since."""
        return self._network_of(bridge) is not None

    def _network_of(self, bridge: str) -> str | None:
        with self._networks_lock:
            if bridge not in self._networks:
                self._networks = {
                    bridge_name(n): n["Id"] for n in self._api.networks() if n.get("Driver") == "bridge"
                }
            return self._networks.get(bridge)

    def owner(self, event: LinkEvent) -> str | None:
        """The container name, or None when no endpoint claims the veth within OWNER_WAIT_SECONDS."""
        if event.peer_netnsid is None:
            return None
        deadline = time.monotonic() + OWNER_WAIT_SECONDS
        delay = FIRST_DELAY_SECONDS
        while True:
            try:
                name = self._lookup(event)
            except Exception as exc:  # the netns or network vanished, or dockerd restarts
                log.debug("owner of %s: %s", event.name, exc)
                name = None
            if name is not None or time.monotonic() + delay > deadline:
                break
            self._stats.retry("veth owner lookup")
            time.sleep(delay)
            delay = min(delay * 1.5, MAX_DELAY_SECONDS)
        if name is None:
            self._stats.fail("veth owner lookup", f"no endpoint claims {event.name}")
        return name

    def _lookup(self, event: LinkEvent) -> str | None:
        netns = self._netns.path(event.peer_netnsid)  # type: ignore[arg-type]
        network = self._network_of(event.bridge)
        if netns is None or network is None:
            return None
        mac = _mac_in(netns, event.peer_ifindex)
        return _endpoint_name(self._api.inspect_network(network), mac)


def _endpoint_name(network: dict[str, Any], mac: str) -> str | None:
    for endpoint in (network.get("Containers") or {}).values():
        if (endpoint.get("MacAddress") or "").lower() == mac:
            return endpoint.get("Name")
    return None
