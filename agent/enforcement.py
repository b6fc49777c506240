"""Policy -> datapath: keep the LPM trie and each veth's slot in step with the rule store.

Called by every process that changes or watches rules (egress-block and friends,
egress-top, egress-agent). Each sync loads the store and rewrites the trie under
datapath.exclusive(), so two processes never undo each other's writes.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterable

import numpy as np

from agent.datapath import (
    Maps,
    check_privileges,
    ensure_bpffs,
    exclusive,
    open_datapath,
    open_pinned_maps,
    our_filters,
    release_if_unheld,
)
from agent.errors import EXIT_USAGE, UserError
from agent.flows import flow_keys
from agent.headers import ensure_kernel_headers
from agent.model import Container, FlowKey, Inventory
from agent.policy import Resolver, Rule, RuleStore, StoreContents, lpm_entries, refresh_names, winning_rule

log = logging.getLogger(__name__)

NAME_REFRESH_SECONDS = 60.0


def apply_rules(maps: Maps, contents: StoreContents, containers: Iterable[Container]) -> None:
    """Write the store's rules into the trie and tag each container veth with its slot."""
    maps.sync_policy(
        (entry.key_bytes(), entry.value_bytes()) for entry in lpm_entries(contents.rules, contents.slots)
    )
    ruled = {rule.container for rule in contents.rules}
    for container in containers:
        for endpoint in container.endpoints:
            maps.set_endpoint(
                endpoint.ifindex, contents.slots.get(container.name, 0), container.name in ruled
            )


def sync(maps: Maps, store: RuleStore, inventory: Inventory) -> StoreContents:
    with exclusive():
        contents = store.load()
        apply_rules(maps, contents, inventory.containers)
    return contents


class Enforcer:
    """For long-running processes: re-syncs on inventory changes and re-resolves host names."""

    def __init__(
        self,
        maps: Maps,
        store: RuleStore,
        resolver: Resolver = socket.getaddrinfo,
        name_refresh_seconds: float = NAME_REFRESH_SECONDS,
    ):
        self.maps = maps
        self.store = store
        self.resolver = resolver
        self.name_refresh_seconds = name_refresh_seconds
        self._next_name_refresh = time.monotonic() + name_refresh_seconds
        self._inventory = Inventory()

    def on_inventory(self, inventory: Inventory) -> None:
        self._inventory = inventory
        contents = sync(self.maps, self.store, inventory)
        running = {c.name for c in inventory.containers}
        if any(rule.pending == (rule.container in running) for rule in contents.rules):
            self.store.sync_pending(running)

    def tick(self) -> None:
        """Once per refresh: re-resolve host names when they are due."""
        if time.monotonic() < self._next_name_refresh:
            return
        self._next_name_refresh = time.monotonic() + self.name_refresh_seconds
        result = refresh_names(self.store, self.resolver)
        for name, why in result.failed.items():
            log.warning("keeping the old addresses of %s: %s", name, why)
        if result.changed:
            log.info("re-resolved %s", ", ".join(sorted({rule.dest for rule in result.changed})))
            sync(self.maps, self.store, self._inventory)


# --- one-shot changes: egress-block / egress-allow / egress-unblock ------------------


def resolve_container_name(inventory: Inventory, ref: str, pending: bool) -> str:
    """Rules are kept by container name: a name, compose service or id prefix -> name."""
    container = inventory.find(ref)
    if container is not None:
        return container.name
    if pending:
        return ref
    raise UserError(
        f"no running container {ref!r}: check 'docker ps', or add --pending to keep the rule until it starts",
        EXIT_USAGE,
    )


def check_can_enforce() -> None:
    """Everything enforcement needs, checked before the store is touched."""
    check_privileges()
    ensure_bpffs()
    ensure_kernel_headers()


def enforce_now(store: RuleStore, inventory: Inventory, container_name: str) -> None:
    """Make the datapath match the store before returning: the change is live when this returns.

    With the datapath already pinned and on the container's veths (egress-top or the
    agent running, or rules left in force), only the maps are written: no compile.
    Otherwise the program is loaded and attached to the container, and stays there as
    long as the container has rules."""
    container = inventory.find(container_name)
    veths = {ep.ifindex for ep in container.endpoints} if container else set()
    if _sync_if_attached(store, inventory, veths):
        return
    with open_datapath() as datapath:
        with exclusive():
            for ifindex in veths:
                datapath.attach(ifindex)
        sync(datapath, store, inventory)


def _sync_if_attached(store: RuleStore, inventory: Inventory, veths: set[int]) -> bool:
    """The fast path: maps pinned and the program on every veth of the container."""
    with exclusive():
        maps = open_pinned_maps()
        if maps is None:
            return False
        try:
            if not veths <= set(our_filters()):
                return False
            apply_rules(maps, store.load(), inventory.containers)
        finally:
            maps.close()
    release_if_unheld(None)
    return True


def flows_of(maps: Maps, container: Container) -> list[FlowKey]:
    """The container's flows in the flow table now (for --dry-run)."""
    read = maps.read_flows()
    veths = [ep.ifindex for ep in container.endpoints]
    return flow_keys(read.keys[np.isin(read.keys["ifindex"], veths)])


def verdict_changes(
    rules_before: list[Rule], rules_after: list[Rule], flows: list[FlowKey]
) -> list[tuple[FlowKey, str, str]]:
    """(flow, before, after) for each flow whose fate the change would alter."""
    changes = []
    for flow in flows:
        dport = flow.dst_port if flow.proto in (6, 17, 132) else None
        before = _fate(winning_rule(rules_before, flow.dst, flow.proto, dport))
        after = _fate(winning_rule(rules_after, flow.dst, flow.proto, dport))
        if before != after:
            changes.append((flow, before, after))
    return changes


def _fate(rule: Rule | None) -> str:
    return "dropped" if rule is not None and rule.action == "block" else "forwarded"
