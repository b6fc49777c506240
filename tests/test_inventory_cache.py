"""The periodic reconcile reads only what changed (agent/inventory.py DockerInventory).

Pure logic: a fake engine and fake netns/host link reads count what a snapshot asks for;
the netns identity is this test process's own /proc/<pid>/ns/net.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

import agent.inventory as inventory
from agent.inventory import DockerInventory

MAC = "02:42:ac:11:00:02"
VETH_IFINDEX = 41


class FakeEngine:
    """One running container on the default bridge; counts inspects."""

    def __init__(self) -> None:
        self.endpoint_id = "ep-1"
        self.inspects = 0

    @property
    def api(self) -> FakeEngine:
        return self

    def networks(self) -> list[dict[str, Any]]:
        return [{"Name": "bridge", "Id": "n" * 64, "Driver": "bridge", "Options": {}}]

    def _networks(self) -> dict[str, Any]:
        return {"bridge": {"EndpointID": self.endpoint_id, "MacAddress": MAC, "IPAddress": "172.17.0.2"}}

    def containers(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return [{"Id": "c" * 64, "NetworkSettings": {"Networks": self._networks()}}]

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        self.inspects += 1
        return {
            "Id": container_id,
            "Name": "/web",
            "State": {"Running": True, "Pid": os.getpid()},
            "Config": {"Image": "busybox", "Labels": {}},
            "HostConfig": {"NetworkMode": "bridge"},
            "NetworkSettings": {"Networks": self._networks()},
        }


class FakeHost:
    """What the netns and host link dumps would say; counts netns entries."""

    def __init__(self) -> None:
        self.netns_reads = 0
        self.host_dumps = 0
        self.host_veths = {VETH_IFINDEX: ("veth1", "docker0")}

    def netns_links(self, pid: int) -> list[tuple[str, str, int]]:
        self.netns_reads += 1
        return [("eth0", MAC, VETH_IFINDEX)]

    def host_links_and_addresses(self) -> tuple[dict[int, tuple[str, str]], set[str]]:
        self.host_dumps += 1
        return dict(self.host_veths), {"172.17.0.1"}

    def interfaces(self) -> frozenset[tuple[int, str]]:
        return frozenset((index, name) for index, (name, _master) in self.host_veths.items())


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> FakeHost:
    fake = FakeHost()
    monkeypatch.setattr(inventory, "_netns_links", fake.netns_links)
    monkeypatch.setattr(inventory, "_host_links_and_addresses", fake.host_links_and_addresses)
    monkeypatch.setattr(inventory, "_host_interfaces", fake.interfaces)
    return fake


def veths(snapshot: inventory.Inventory) -> list[str]:
    return [ep.veth for c in snapshot.containers for ep in c.endpoints]


def test_an_unchanged_container_is_neither_inspected_nor_entered_again(host: FakeHost) -> None:
    engine = FakeEngine()
    source = DockerInventory(engine)  # type: ignore[arg-type]
    assert veths(source.snapshot(full=True)) == ["veth1"]
    assert veths(source.snapshot()) == ["veth1"]
    assert (engine.inspects, host.netns_reads, host.host_dumps) == (1, 1, 1)


def test_new_endpoint_ids_in_the_listing_mean_a_new_inspect(host: FakeHost) -> None:
    engine = FakeEngine()
    source = DockerInventory(engine)  # type: ignore[arg-type]
    source.snapshot()
    engine.endpoint_id = "ep-2"  # a restart or a connect the event stream missed
    assert veths(source.snapshot()) == ["veth1"]
    assert engine.inspects == 2


def test_a_vanished_host_veth_means_the_netns_is_read_again(host: FakeHost) -> None:
    engine = FakeEngine()
    source = DockerInventory(engine)  # type: ignore[arg-type]
    source.snapshot()
    host.host_veths = {VETH_IFINDEX + 1: ("veth2", "docker0")}
    assert veths(source.snapshot()) == []
    assert (host.netns_reads, host.host_dumps) == (2, 2)


def test_full_and_forget_read_everything_again(host: FakeHost) -> None:
    engine = FakeEngine()
    source = DockerInventory(engine)  # type: ignore[arg-type]
    source.snapshot()
    source.snapshot(full=True)
    source.forget("c" * 64)
    source.snapshot()
    assert (engine.inspects, host.netns_reads) == (3, 3)
