"""Inventory layer: which container owns which host-side veth, as containers come and go.

A container's interface and its host-side veth are a pair: the container's `eth0`
has IFLA_LINK == the host veth's ifindex. We read IFLA_LINK with netlink from a
thread that entered the container's netns (sysfs would follow the mount ns and
lie), and match interfaces to Docker networks by MAC address.

The netns is entered through Docker's sandbox file (inspect's SandboxKey, a bind mount
of the netns under /var/run/docker/netns): it needs no view of the host's processes (a
Swarm task has no --pid host) and no CAP_SYS_PTRACE for containers of another uid.
/proc/PID/ns/net is the fallback where that file is not visible (not bind-mounted).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.docker_api import DEFAULT_SOCKET, EngineClient, not_found
from agent.errors import EXIT_DOCKER, EXIT_USAGE, UserError
from agent.model import Container, Endpoint, Inventory
from agent.rtnl import RtnlSocket

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
# Entering a netns costs a thread and a netlink dump: 200 containers made every reconcile a
# 1-3 s burst. A netns's links are reused while it is the same netns (pid and inode) and
# they still explain its Docker networks and host veths; re-read after this long anyway
# (jittered so 200 containers' re-reads do not fall on one reconcile), the safety net.
NETNS_REREAD_SECONDS = 300.0

NetnsLinks = list[tuple[str, str, int]]


def connect_docker() -> EngineClient:
    """A client for the engine DOCKER_HOST names (or the default socket), or a one-line error.
    A unix socket gets our light client; anything else (tcp://, ssh://, TLS) the docker SDK."""
    target = os.environ.get("DOCKER_HOST") or f"unix://{DEFAULT_SOCKET}"
    try:
        if target.startswith("unix://"):
            client = EngineClient(target.removeprefix("unix://"))
        else:
            import docker  # imported only here: requests and urllib3 cost ~75 ms of every start

            client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        raise UserError(
            f"Docker engine not reachable at {target} ({type(exc).__name__}): "
            "start dockerd or set DOCKER_HOST",
            EXIT_DOCKER,
        ) from None
    return client


def in_netns(netns_path: str, fn: Callable[[], Any]) -> Any:
    """Run fn in a thread that joined the netns: setns(CLONE_NEWNET) is per thread, so
    the rest of the process stays where it is, and it costs no fork (pyroute2's NetNS does)."""
    libc = ctypes.CDLL(None, use_errno=True)
    outcome: dict[str, Any] = {}

    def worker() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {netns_path}")
            finally:
                os.close(fd)
            outcome["value"] = fn()
        except Exception as exc:
            outcome["error"] = exc

    # The thread ends right after, so its changed netns never leaks into other work.
    thread = threading.Thread(target=worker, name="netns-reader", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@functools.cache
def _nsfs_device() -> int:
    """The device of every netns file (nsfs has one per boot): read once, not once per
    container and reconcile."""
    return os.stat("/proc/self/ns/net").st_dev


def is_netns(path: str) -> bool:
    """A netns file (nsfs), not the empty file a sandbox's mount point is where the mount
    did not propagate (a bind mount of /var/run/docker/netns without rslave)."""
    try:
        return os.stat(path).st_dev == _nsfs_device()
    except OSError:
        return False


def netns_file(info: dict[str, Any], usable: Callable[[str], bool] = is_netns) -> str | None:
    """The file to enter a running container's netns by: its sandbox file when this
    process sees that netns there, else its process's /proc entry, else None."""
    sandbox = (info.get("NetworkSettings") or {}).get("SandboxKey") or ""
    if sandbox and usable(sandbox):
        return sandbox
    pid = info["State"].get("Pid")
    by_process = f"/proc/{pid}/ns/net"
    return by_process if pid and usable(by_process) else None


def _netns_links(netns: str) -> NetnsLinks:
    """(name, mac, IFLA_LINK) of each interface in the netns that has a peer."""

    def read() -> NetnsLinks:
        with RtnlSocket() as rtnl:
            # a peer in another netns: a veth (or macvlan/ipvlan, whose peer is no veth)
            return [
                (link.name, link.mac, link.peer_index) for link in rtnl.links() if link.peer_in_other_netns
            ]

    return in_netns(netns, read)


def bridge_name(network: dict[str, Any]) -> str:
    """The Linux bridge of a Docker bridge network."""
    options = network.get("Options") or {}
    if BRIDGE_NAME_OPTION in options:
        return options[BRIDGE_NAME_OPTION]
    return "docker0" if network["Name"] == "bridge" else f"br-{network['Id'][:12]}"


class DockerInventory:
    """Builds Inventory snapshots from the Docker API and netlink."""

    def __init__(self, client: EngineClient):
        self.client = client  # or a docker.DockerClient: the same calls
        self._inspect_cache: dict[str, dict[str, Any]] = {}
        # container id -> ((netns path, netns inode), links, monotonic time to re-read by)
        self._netns_cache: dict[str, tuple[tuple[str, int], NetnsLinks, float]] = {}
        # a 200-veth dump, decoded: redone only when if_nameindex() changed
        self._host_interfaces: frozenset[tuple[int, str]] = frozenset()
        self._host_state: tuple[dict[int, tuple[str, str]], set[str]] = ({}, set())

    def forget(self, container_id: str) -> None:
        self._inspect_cache.pop(container_id, None)
        self._netns_cache.pop(container_id, None)

    def _inspect(self, listed: dict[str, Any]) -> dict[str, Any] | None:
        """The cached inspect while the listing shows the same endpoints (a restart or a
        missed connect gives new EndpointIDs), else a fresh one."""
        container_id = listed["Id"]
        cached = self._inspect_cache.get(container_id)
        if cached is None or _endpoint_ids(cached) != _endpoint_ids(listed):
            try:
                cached = _cacheable(self.client.api.inspect_container(container_id))
            except Exception as exc:
                if not_found(exc):
                    return None
                raise
            self._inspect_cache[container_id] = cached
        return cached

    def snapshot(self, full: bool = False) -> Inventory:
        """Current inventory; full=True re-inspects every container and re-enters every
        netns (the rare safety net: otherwise only what the listing shows changed is read)."""
        if full:
            self._inspect_cache.clear()
            self._netns_cache.clear()
        networks = self.client.api.networks()
        bridges = {n["Name"]: bridge_name(n) for n in networks if n.get("Driver") == "bridge"}
        drivers = {n["Name"]: n.get("Driver", "") for n in networks}
        host_links, host_addresses = self._cached_host_links(full)
        listed = self.client.api.containers(filters={"status": "running"})
        running_ids = {c["Id"] for c in listed}
        for stale in set(self._inspect_cache) - running_ids:
            del self._inspect_cache[stale]
        for stale in set(self._netns_cache) - running_ids:
            del self._netns_cache[stale]
        inspected = [i for i in (self._inspect(c) for c in listed) if i and i["State"].get("Running")]
        names = {i["Id"]: i["Name"].lstrip("/") for i in inspected}

        sharers: dict[str, list[str]] = {}
        for info in inspected:
            mode = info["HostConfig"].get("NetworkMode", "")
            if mode.startswith("container:"):
                owner_id = self._resolve_owner(mode.split(":", 1)[1], names)
                sharers.setdefault(owner_id, []).append(names[info["Id"]])

        containers = [
            self._container(info, names, bridges, drivers, host_links, tuple(sharers.get(info["Id"], ())))
            for info in inspected
        ]
        return Inventory(
            containers=tuple(sorted(containers, key=lambda c: c.name)),
            bridges=frozenset(bridges.values()),
            host_addresses=frozenset(host_addresses),
        )

    def _cached_host_links(self, full: bool) -> tuple[dict[int, tuple[str, str]], set[str]]:
        """The last dump while the host's interfaces (index, name) are the same ones: a veth
        that comes or goes changes them; a changed address waits for a full snapshot."""
        interfaces = _host_interfaces()
        if full or interfaces != self._host_interfaces or not self._host_interfaces:
            self._host_state = _host_links_and_addresses()
            self._host_interfaces = interfaces
        return self._host_state

    @staticmethod
    def _resolve_owner(ref: str, names: dict[str, str]) -> str:
        for cid, name in names.items():
            if ref in (cid, name) or cid.startswith(ref):
                return cid
        return ref

    def _container(
        self,
        info: dict[str, Any],
        names: dict[str, str],
        bridges: dict[str, str],
        drivers: dict[str, str],
        host_links: dict[int, tuple[str, str]],
        sharers: tuple[str, ...],
    ) -> Container:
        labels = info["Config"].get("Labels") or {}
        mode = info["HostConfig"].get("NetworkMode", "")
        base = {
            "id": info["Id"],
            "name": names[info["Id"]],
            "image": info["Config"].get("Image", ""),
            "compose_project": labels.get(COMPOSE_PROJECT_LABEL),
            "compose_service": labels.get(COMPOSE_SERVICE_LABEL),
            "netns_sharers": sharers,
        }
        if mode.startswith("container:"):
            owner = names.get(self._resolve_owner(mode.split(":", 1)[1], names), mode.split(":", 1)[1])
            return Container(**base, netns_owner=owner)
        if mode == "host":
            return Container(**base, unobservable_reason="host network: its traffic crosses no veth")
        if mode == "none":
            return Container(**base, unobservable_reason="network none: no interface but loopback")
        networks = info["NetworkSettings"].get("Networks") or {}
        endpoints = self._endpoints(info, networks, bridges, host_links)
        if endpoints:
            return Container(**base, endpoints=endpoints)
        others = [f"{drivers.get(n, '?')} network {n}" for n in networks if n not in bridges]
        reason = (
            f"{', '.join(others)}: no host-side veth to attach to"
            if others
            else "no host-side veth found (yet)"
        )
        return Container(**base, unobservable_reason=reason)

    def _endpoints(
        self,
        info: dict[str, Any],
        networks: dict[str, Any],
        bridges: dict[str, str],
        host_links: dict[int, tuple[str, str]],
    ) -> tuple[Endpoint, ...]:
        bridged = {
            settings.get("MacAddress", "").lower(): (name, settings)
            for name, settings in networks.items()
            if name in bridges
        }
        if not bridged or not info["State"].get("Pid"):
            return ()
        try:
            links = self._links(info, set(bridged), host_links)
        except OSError as exc:
            log.debug("cannot read netns of %s: %s", info["Name"], exc)
            return ()
        endpoints = []
        for _name, mac, peer in links:
            if mac.lower() not in bridged or peer not in host_links:
                continue
            network, settings = bridged[mac.lower()]
            veth, master = host_links[peer]
            endpoints.append(
                Endpoint(
                    ifindex=peer,
                    veth=veth,
                    network=network,
                    bridge=master,
                    ipv4=settings.get("IPAddress") or None,
                    ipv6=settings.get("GlobalIPv6Address") or None,
                )
            )
        return tuple(sorted(endpoints, key=lambda e: e.network))

    def _links(
        self, info: dict[str, Any], macs: set[str], host_links: dict[int, tuple[str, str]]
    ) -> NetnsLinks:
        """The container's netns links: cached while the netns is the same one and its links
        still give every bridged MAC a host veth that exists; else read by entering it."""
        netns = netns_file(info)
        if netns is None:
            raise FileNotFoundError("neither its sandbox file nor its /proc/PID/ns/net is visible")
        identity = (netns, os.stat(netns).st_ino)
        cached = self._netns_cache.get(info["Id"])
        if cached is not None:
            cached_identity, links, reread_by = cached
            explained = {mac.lower() for _name, mac, peer in links if peer in host_links}
            if cached_identity == identity and macs <= explained and time.monotonic() < reread_by:
                return links
        links = _netns_links(netns)
        reread_by = time.monotonic() + NETNS_REREAD_SECONDS * random.uniform(0.5, 1.0)
        self._netns_cache[info["Id"]] = (identity, links, reread_by)
        return links


def _cacheable(info: dict[str, Any]) -> dict[str, Any]:
    """An inspect as the cache keeps it: HostConfig (half of its ~28 KB of Python objects) cut
    to the network mode, Mounts and GraphDriver left out; whole, 200 of them held ~5 MB."""
    kept = {key: value for key, value in info.items() if key not in ("Mounts", "GraphDriver")}
    kept["HostConfig"] = {"NetworkMode": (info.get("HostConfig") or {}).get("NetworkMode", "")}
    return kept


def _endpoint_ids(container: dict[str, Any]) -> dict[str, str]:
    """Network name -> EndpointID, as both the listing and an inspect give them."""
    networks = (container.get("NetworkSettings") or {}).get("Networks") or {}
    return {name: settings.get("EndpointID", "") for name, settings in networks.items()}


def _host_interfaces() -> frozenset[tuple[int, str]]:
    return frozenset(socket.if_nameindex())  # one libc call, no Python decoding


def _host_links_and_addresses() -> tuple[dict[int, tuple[str, str]], set[str]]:
    """Host veths (ifindex -> (name, master bridge name)) and every host address."""
    with RtnlSocket() as rtnl:
        links = rtnl.links()
        addresses = rtnl.addresses()
    names = {link.index: link.name for link in links}
    veths = {link.index: (link.name, names.get(link.master, "")) for link in links if link.kind == "veth"}
    return veths, addresses


def bridge_veths(bridges: frozenset[str]) -> dict[int, str]:
    """ifindex -> name of every veth enslaved to one of these bridges."""
    veths, _ = _host_links_and_addresses()
    return {index: name for index, (name, master) in veths.items() if master in bridges}


def require_containers(inventory: Inventory, refs: tuple[str, ...]) -> list[Container]:
    """The containers named on the command line, or a one-line error for the first unknown."""
    found = []
    for ref in refs:
        container = inventory.find(ref)
        if container is None:
            raise UserError(f"no running container named {ref!r}: see 'docker ps' for names", EXIT_USAGE)
        found.append(container)
    return found
