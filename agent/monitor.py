"""Keeps the datapath attached to every container veth and turns reads into Snapshots.

The glue between the layers, used by every long-running front end: the inventory
watcher says which veths exist and whose they are; the monitor attaches the
program, tells the datapath each veth's policy slot, and feeds reads of the flow
table to the aggregator.

A new veth is attached when it is enslaved to a Docker bridge and tagged (slot and
policy flag) as soon as its peer moves into the container's netns and the owner is
found (agent/veth_owner.py): before the container's process runs, without waiting for
Docker's start event or a full refresh. While rules exist, the datapath holds a veth
that has no tag yet, so a lookup that loses the race costs a held packet, never a leak.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from agent.agent_status import AgentStatus
from agent.datapath import Datapath, RuleHits
from agent.docker_api import EngineClient
from agent.enforcement import NAME_REFRESH_SECONDS, Enforcer
from agent.enforcement_state import ContainerEnforcement, enforcement_states, not_enforced
from agent.flows import FlowAggregator
from agent.inventory import DockerInventory, bridge_veths
from agent.inventory_watch import InventoryWatcher, LinkEvent
from agent.latency import LatencyHistogram
from agent.model import Inventory, Snapshot
from agent.policy import Rule, RuleStore
from agent.retry import RetryStats
from agent.table_reader import FlowTableReader
from agent.veth_owner import VethOwners

log = logging.getLogger(__name__)

OWNER_LOOKUP_THREADS = 8  # 20 containers starting at once are looked up side by side


class Monitor:
    def __init__(
        self,
        datapath: Datapath,
        client: EngineClient,
        store: RuleStore,
        name_refresh_seconds: float = NAME_REFRESH_SECONDS,
        build_flows: bool = True,
    ):
        self.datapath = datapath
        self.retry_stats = RetryStats()
        self.enforcer = Enforcer(datapath, store, name_refresh_seconds=name_refresh_seconds)
        self.aggregator = FlowAggregator(build_flows=build_flows)
        self.table_reader = FlowTableReader(datapath)
        self.owners = VethOwners(client, self.retry_stats)
        self.started_at = time.time()
        self.attach_latency = LatencyHistogram()  # link event -> attached, for /metrics
        self._attached: set[int] = set()
        # Veths tagged (or being tagged) at link time: a refresh listing that predates them
        # must not forget their endpoint entries.
        self._tagged: set[int] = set()
        self._lock = threading.Lock()  # _attached, _tagged and forgetting endpoint entries
        self._attach_lock = threading.Lock()  # one tc change at a time; never held by a tag
        self._lookups = ThreadPoolExecutor(OWNER_LOOKUP_THREADS, thread_name_prefix="veth-owner")
        # The latest poll's enforcement states: status() reuses them, since reading which veths
        # the datapath enforces walks the endpoint map (two syscalls a veth) and the status is
        # published right after each poll.
        self._polled_states: dict[str, ContainerEnforcement] | None = None
        self.watcher = InventoryWatcher(
            DockerInventory(client), on_link=self.on_link, on_change=self.sync, stats=self.retry_stats
        )

    @property
    def inventory(self) -> Inventory:
        return self.watcher.current

    def start(self) -> Inventory:
        inventory = self.watcher.start()
        self.poll()  # baseline: the first interval's deltas start here
        # What start-up made (modules, the inventory, the baseline) lives as long as the process:
        # out of the collector's sight, a full collection walks only what the intervals make.
        gc.collect()
        gc.freeze()
        return inventory

    def stop(self) -> None:
        self.watcher.stop()
        self._lookups.shutdown(wait=False, cancel_futures=True)
        self.table_reader.close()

    def attach(self, ifindex: int) -> bool:
        """Returns whether this call attached it (False: it already was)."""
        with self._attach_lock:
            with self._lock:
                if ifindex in self._attached:
                    return False
            self.datapath.attach(ifindex)
            with self._lock:
                self._attached.add(ifindex)
            return True

    def on_link(self, event: LinkEvent) -> bool:
        """Attach a veth of a Docker bridge at once; look its owner up once its peer is in
        the container's netns. Returns whether the veth is a container's."""
        seen_at = time.monotonic()
        if event.removed:
            with self._lock:
                self._tagged.discard(event.ifindex)
                known = event.ifindex in self._attached
                self._attached.discard(event.ifindex)
            return known
        if event.bridge not in self.inventory.bridges and not self.owners.is_docker_bridge(event.bridge):
            return False
        if self.attach(event.ifindex):
            self.attach_latency.observe(time.monotonic() - seen_at)
        if event.peer_netnsid is not None:
            with self._lock:
                new = event.ifindex not in self._tagged
                self._tagged.add(event.ifindex)
            if new:
                self._lookups.submit(self._tag_owner, event, time.monotonic())
        return True

    def _tag_owner(self, event: LinkEvent, seen_at: float) -> None:
        try:
            name = self.owners.owner(event)
            found_at = time.monotonic()
            if name is None:  # the next refresh tags it; until then it is held if rules exist
                with self._lock:
                    self._tagged.discard(event.ifindex)
                return
            slot, has_policy = self.enforcer.tag_for(name)
            with self._lock:
                if event.ifindex in self._tagged:  # not removed meanwhile
                    self.datapath.set_endpoint(event.ifindex, slot, has_policy)
            log.debug(
                "tagged %s for %s (slot %d): owner found in %.1f ms, tagged after %.1f ms",
                event.name,
                name,
                slot,
                (found_at - seen_at) * 1000,
                (time.monotonic() - seen_at) * 1000,
            )
        except Exception as exc:
            log.warning("cannot tag new veth %s: %s", event.name, exc)

    def sync(self, inventory: Inventory) -> None:
        """Attach what is new, give each veth its rules, forget vanished veths."""
        present = bridge_veths(inventory.bridges)
        with self._lock:
            self._attached &= set(present) | self._tagged  # a vanished veth took its filter with it
        for ifindex in present:
            try:
                self.attach(ifindex)
            except Exception as exc:  # the veth may vanish between listing and attaching
                log.debug("attach to %s failed: %s", present[ifindex], exc)
        with self._lock:
            self.datapath.forget_endpoints(keep=set(present) | self._tagged)
            # tagged from here on by the refresh: their stop's link events need no lookup
            self._tagged |= {ep.ifindex for c in inventory.containers for ep in c.endpoints} & set(present)
        self.enforcer.on_inventory(inventory)

    def enforcement(self) -> dict[str, ContainerEnforcement]:
        rules = self.enforcer.contents.rules
        if not rules:  # no state to tell: the endpoint map is not walked for nothing
            return {}
        with self._lock:
            attached = set(self._attached)
        return enforcement_states(rules, self.inventory, attached, self.datapath.policy_endpoints())

    def poll(self) -> Snapshot:
        self.enforcer.tick()
        read = self.table_reader.read(self.aggregator.full_read_wanted)
        snapshot = self.aggregator.update(read, self.inventory)
        self._polled_states = self.enforcement()
        return replace(snapshot, not_enforced=tuple(not_enforced(self._polled_states)))

    def rule_hits(self) -> list[tuple[Rule, RuleHits]]:
        """Each rule with the datapath's cumulative hit counters (for /metrics)."""
        hits = self.datapath.read_rule_hits()
        return [(rule, hits[rule.rule_id]) for rule in self.enforcer.contents.rules if rule.rule_id in hits]

    def status(self) -> AgentStatus:
        """For the status file: what `egress-agent status` prints, as of the latest poll."""
        states = self.enforcement() if self._polled_states is None else self._polled_states
        rules = self.enforcer.contents.rules
        enforced = {name for name, state in states.items() if state.state == "enforced"}
        with self._lock:
            attached = set(self._attached)
        return AgentStatus(
            pid=os.getpid(),
            started_at=self.started_at,
            updated_at=time.time(),
            attached_veths=len(attached),
            rules=len(rules),
            rules_enforced=sum(1 for rule in rules if rule.container in enforced),
            containers_enforced=sorted(enforced),
            not_enforced={
                name: state.text for name, state in states.items() if state.state == "not-enforced"
            },
            refresh_retries=self.retry_stats.retries,
            refresh_failures=self.retry_stats.failures,
            last_failure=self.retry_stats.last_failure,
        )
