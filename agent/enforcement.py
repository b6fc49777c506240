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
from agent.datapath.headers import ensure_kernel_headers
from agent.datapath.program import pinned_program_matches
from agent.errors import EXIT_USAGE, UserError
from agent.model import Container, FlowKey, Inventory
from agent.policy import Resolver, Rule, RuleStore, StoreContents, lpm_entries, refresh_names, winning_rule

log = logging.getLogger(__name__)

NAME_REFRESH_SECONDS = 60.0


def apply_rules(maps: Maps, contents: StoreContents, containers: Iterable[Container]) -> None:
    """Write the store's rules into the trie and tag each container veth with its slot.

    While any rule exists (pending ones too), a veth with no endpoint entry is held:
    its packets are dropped until its owner is known (Monitor tags it at link time),
    so a container with rules is never open between its first packet and its tag."""
    maps.set_hold_unknown(bool(contents.rules))
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


def endpoint_tag(contents: StoreContents, container_name: str) -> tuple[int, bool]:
    """(slot, has_policy) for a veth of this container: slot 0 when it has no rule."""
    if any(rule.container == container_name for rule in contents.rules):
        return contents.slots[container_name], True
    return 0, False


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
        self.contents = StoreContents()
        self._store_seen: tuple[int, int, int] | None = None

    def on_inventory(self, inventory: Inventory) -> None:
        self._inventory = inventory
        self._store_seen = self._store_signature()
        contents = sync(self.maps, self.store, inventory)
        self.contents = contents
        running = {c.name for c in inventory.containers}
        if any(rule.pending == (rule.container in running) for rule in contents.rules):
            self.store.sync_pending(running)

    def tag_for(self, container_name: str) -> tuple[int, bool]:
        """(slot, has_policy) for a new veth of this container, from the store as it is now.
        The caller writes it without datapath.exclusive(): that lock may be held for a whole
        compile elsewhere, one map write cannot tear, and a later sync writes the same tag."""
        return endpoint_tag(self.store.load(), container_name)

    def _store_signature(self) -> tuple[int, int, int] | None:
        try:
            stat = self.store.path.stat()
        except FileNotFoundError:
            return None
        return stat.st_ino, stat.st_mtime_ns, stat.st_size

    def tick(self) -> None:
        """Once per refresh: follow rule changes other processes made (egress-block writes
        the store and the maps itself; this keeps our view, pending flags and status in
        step), and re-resolve host names when they are due."""
        if self._store_signature() != self._store_seen:
            self.on_inventory(self._inventory)
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


def require_enforceable(inventory: Inventory, container_name: str) -> None:
    """No rule is accepted that nothing could enforce: a running container without a veth
    of its own is refused with what to do instead. (A name that is not running becomes a
    pending rule; egress-rules says if it later starts without a veth.)"""
    container = inventory.find(container_name)
    if container is None:
        return
    if container.netns_owner:
        raise UserError(
            f"{container.name} shares the network namespace of {container.netns_owner} "
            f"(--network container:{container.netns_owner}): its packets leave by "
            f"{container.netns_owner}'s veth, so put the rule on {container.netns_owner} "
            "(it then binds every container in that namespace)",
            EXIT_USAGE,
        )
    if not container.endpoints:
        reason = container.why_not_observed or "no host-side veth"
        raise UserError(
            f"{container.name} cannot be enforced ({reason}): egress-top enforces on Docker "
            "bridge veths only; no rule was added",
            EXIT_USAGE,
        )


def check_can_enforce() -> None:
    """Everything enforcement needs, checked before the store is touched. Headers only
    matter to a compile: none happens while the matching program is pinned."""
    check_privileges()
    ensure_bpffs()
    if not pinned_program_matches():
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
    import numpy as np  # only here: the rule commands' fast path loads no numpy

    from agent.flows import flow_keys

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
