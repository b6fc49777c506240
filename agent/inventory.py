"""Inventory layer: which container owns which host-side veth, as containers come and go.

A container's interface and its host-side veth are a pair: the container's `eth0`
has IFLA_LINK == the host veth's ifindex. We read IFLA_LINK with netlink from a
thread that entered the container's netns (sysfs would follow the mount ns and
lie), and match interfaces to Docker networks by MAC address.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import socket
import threading
from collections.abc import Callable
from typing import Any

import docker
import docker.errors
from pyroute2 import IPRoute

from agent.errors import EXIT_DOCKER, EXIT_USAGE, UserError
from agent.model import Container, Endpoint, Inventory

log = logging.getLogger(__name__)

CLONE_NEWNET = 0x40000000
COMPOSE_PROJECT_LABEL = "com.docker.compose.project"
COMPOSE_SERVICE_LABEL = "com.docker.compose.service"
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"
RECONCILE_SECONDS = 10.0
# Docker events that can change which veth belongs to which container.
INVENTORY_EVENTS = {"start", "restart", "die", "stop", "kill", "destroy", "connect", "disconnect", "create"}


def connect_docker() -> docker.DockerClient:
    """A client for the engine DOCKER_HOST names (or the default socket), or a one-line error."""
    target = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception as exc:
        raise UserError(
            f"Docker engine not reachable at {target} ({type(exc).__name__}): "
            "start dockerd or set DOCKER_HOST",
            EXIT_DOCKER,
        ) from None
    return client


def _in_netns(netns_path: str, fn: Callable[[], Any]) -> Any:
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


def _netns_links(pid: int) -> list[tuple[str, str, int]]:
    """(name, mac, IFLA_LINK) of each interface in the process's netns that has a peer."""

    def read() -> list[tuple[str, str, int]]:
        with IPRoute() as ipr:
            links = []
            for link in ipr.get_links():
                # a peer in another netns: a veth (or macvlan/ipvlan, whose peer is no veth)
                if link.get_attr("IFLA_LINK_NETNSID") is not None:
                    peer = link.get_attr("IFLA_LINK") or 0
                    links.append((link.get_attr("IFLA_IFNAME"), link.get_attr("IFLA_ADDRESS") or "", peer))
            return links

    return _in_netns(f"/proc/{pid}/ns/net", read)


def _bridge_name(network: dict[str, Any]) -> str:
    options = network.get("Options") or {}
    if BRIDGE_NAME_OPTION in options:
        return options[BRIDGE_NAME_OPTION]
    return "docker0" if network["Name"] == "bridge" else f"br-{network['Id'][:12]}"


class DockerInventory:
    """Builds Inventory snapshots from the Docker API and netlink."""

    def __init__(self, client: docker.DockerClient):
        self.client = client
        self._inspect_cache: dict[str, dict[str, Any]] = {}

    def forget(self, container_id: str) -> None:
        self._inspect_cache.pop(container_id, None)

    def _inspect(self, container_id: str) -> dict[str, Any] | None:
        cached = self._inspect_cache.get(container_id)
        if cached is None:
            try:
                cached = self.client.api.inspect_container(container_id)
            except docker.errors.NotFound:
                return None
            self._inspect_cache[container_id] = cached
        return cached

    def snapshot(self, full: bool = False) -> Inventory:
        """Current inventory; full=True re-inspects every container (the safety net)."""
        if full:
            self._inspect_cache.clear()
        networks = self.client.api.networks()
        bridges = {n["Name"]: _bridge_name(n) for n in networks if n.get("Driver") == "bridge"}
        drivers = {n["Name"]: n.get("Driver", "") for n in networks}
        host_links, host_addresses = _host_links_and_addresses()
        listed = self.client.api.containers(filters={"status": "running"})
        running_ids = {c["Id"] for c in listed}
        for stale in set(self._inspect_cache) - running_ids:
            del self._inspect_cache[stale]
        inspected = [i for i in (self._inspect(c["Id"]) for c in listed) if i and i["State"].get("Running")]
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
            "pid": info["State"].get("Pid", 0),
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

    @staticmethod
    def _endpoints(
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
            links = _netns_links(info["State"]["Pid"])
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


def _host_links_and_addresses() -> tuple[dict[int, tuple[str, str]], set[str]]:
    """Host veths (ifindex -> (name, master bridge name)) and every host address."""
    with IPRoute() as ipr:
        links = ipr.get_links()
        names = {link["index"]: link.get_attr("IFLA_IFNAME") for link in links}
        veths = {}
        for link in links:
            info = link.get_attr("IFLA_LINKINFO")
            if info is not None and info.get_attr("IFLA_INFO_KIND") == "veth":
                veths[link["index"]] = (names[link["index"]], names.get(link.get_attr("IFLA_MASTER"), ""))
        addresses = {addr.get_attr("IFA_ADDRESS") for addr in ipr.get_addr()}
    return veths, {a for a in addresses if a}


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


class InventoryWatcher:
    """Keeps an Inventory current: Docker events, veth link events, periodic reconcile.

    on_veth(ifindex) fires the moment a veth is enslaved to a Docker bridge — before
    Docker reports the container started — so the caller can attach before the
    container's first packet. on_change(inventory) fires after each refresh.
    """

    def __init__(
        self,
        inventory: DockerInventory,
        on_veth: Callable[[int], None],
        on_change: Callable[[Inventory], None],
        reconcile_seconds: float = RECONCILE_SECONDS,
    ):
        self._source = inventory
        self._on_veth = on_veth
        self._on_change = on_change
        self._reconcile_seconds = reconcile_seconds
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._events_stream: Any = None
        self._threads: list[threading.Thread] = []
        self.current = Inventory()

    def start(self) -> Inventory:
        self.refresh(full=True)
        for target, name in (
            (self._follow_docker_events, "docker-events"),
            (self._follow_links, "link-events"),
            (self._refresh_loop, "inventory-refresh"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self.current

    def stop(self) -> None:
        self._stop.set()
        self._dirty.set()
        if self._events_stream is not None:
            with contextlib.suppress(Exception):
                self._events_stream.close()
        for thread in self._threads:
            thread.join(timeout=2)

    def refresh(self, full: bool = False) -> Inventory:
        self.current = self._source.snapshot(full=full)
        self._on_change(self.current)
        return self.current

    def _refresh_loop(self) -> None:
        while not self._stop.is_set():
            triggered = self._dirty.wait(timeout=self._reconcile_seconds)
            if self._stop.is_set():
                return
            self._dirty.clear()
            try:
                self.refresh(full=not triggered)
            except Exception as exc:  # the engine may restart: keep going, say why
                log.warning("inventory refresh failed: %s", exc)

    def _follow_docker_events(self) -> None:
        while not self._stop.is_set():
            try:
                self._events_stream = self._source.client.events(
                    decode=True, filters={"type": ["container", "network"]}
                )
                for event in self._events_stream:
                    action = (event.get("Action") or event.get("status") or "").split(":")[0]
                    if action in INVENTORY_EVENTS:
                        actor = (event.get("Actor") or {}).get("Attributes", {}).get(
                            "container"
                        ) or event.get("id")
                        if actor:
                            self._source.forget(actor)
                        self._dirty.set()
            except Exception as exc:
                if not self._stop.is_set():
                    log.warning("docker event stream ended (%s): reconnecting", exc)
                    self._stop.wait(1.0)

    def _follow_links(self) -> None:
        with IPRoute() as ipr:
            ipr.bind()
            while not self._stop.is_set():
                ready, _, _ = select.select([ipr.fileno()], [], [], 0.5)
                if not ready:
                    continue
                for message in ipr.get():
                    self._handle_link_message(message)

    def _handle_link_message(self, message: Any) -> None:
        if message.get("event") != "RTM_NEWLINK":
            return
        info = message.get_attr("IFLA_LINKINFO")
        master = message.get_attr("IFLA_MASTER")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "veth" or not master:
            return
        try:
            master_name = socket.if_indextoname(master)
        except OSError:
            return
        if master_name in self.current.bridges:
            try:
                self._on_veth(message["index"])
            except Exception as exc:
                log.warning("cannot attach to new veth %s: %s", message.get_attr("IFLA_IFNAME"), exc)
            self._dirty.set()
