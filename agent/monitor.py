"""Keeps the datapath attached to every container veth and turns reads into Snapshots.

The glue between the layers, used by every long-running front end: the inventory
watcher says which veths exist and whose they are; the monitor attaches the
program, tells the datapath each veth's policy slot, and feeds reads of the flow
table to the aggregator.
"""

from __future__ import annotations

import logging
import threading

import docker

from agent.datapath import Datapath
from agent.enforcement import NAME_REFRESH_SECONDS, Enforcer
from agent.flows import FlowAggregator, TableRead
from agent.inventory import DockerInventory, InventoryWatcher, bridge_veths
from agent.model import Inventory, Snapshot
from agent.policy import RuleStore

log = logging.getLogger(__name__)


class Monitor:
    def __init__(
        self,
        datapath: Datapath,
        client: docker.DockerClient,
        store: RuleStore,
        name_refresh_seconds: float = NAME_REFRESH_SECONDS,
    ):
        self.datapath = datapath
        self.enforcer = Enforcer(datapath, store, name_refresh_seconds=name_refresh_seconds)
        self.aggregator = FlowAggregator()
        self._attached: set[int] = set()
        self._lock = threading.Lock()
        self.watcher = InventoryWatcher(DockerInventory(client), on_veth=self.attach, on_change=self.sync)

    @property
    def inventory(self) -> Inventory:
        return self.watcher.current

    def start(self) -> Inventory:
        inventory = self.watcher.start()
        self.poll()  # baseline: the first interval's deltas start here
        return inventory

    def stop(self) -> None:
        self.watcher.stop()

    def attach(self, ifindex: int) -> None:
        with self._lock:
            if ifindex in self._attached:
                return
            self.datapath.attach(ifindex)
            self._attached.add(ifindex)

    def sync(self, inventory: Inventory) -> None:
        """Attach what is new, give each veth its rules, forget vanished veths."""
        present = bridge_veths(inventory.bridges)
        with self._lock:
            self._attached &= set(present)  # a vanished veth took its filter with it
        for ifindex in present:
            try:
                self.attach(ifindex)
            except Exception as exc:  # the veth may vanish between listing and attaching
                log.debug("attach to %s failed: %s", present[ifindex], exc)
        self.datapath.forget_endpoints(keep=present)
        self.enforcer.on_inventory(inventory)

    def poll(self) -> Snapshot:
        self.enforcer.tick()
        read = self.datapath.read_flows()
        counters = self.datapath.read_ifindex_counters()
        return self.aggregator.update(
            TableRead(
                keys=read.keys,
                stats=read.stats,
                monotonic_ns=read.monotonic_ns,
                table_size=self.datapath.flow_table_size,
                flows_created=self.datapath.flows_created(),
                dropped_by_ifindex={i: c.dropped_packets for i, c in counters.items()},
                read_started_ns=read.started_ns,
            ),
            self.inventory,
        )
