"""Is each container's rule set in force right now? Read from what the kernel holds.

A rule is in force on a veth when our tc filter is on it and its endpoint entry carries
the policy flag. egress-rules asks with the real tc filters and pinned maps; the
monitor asks with the veths it attached, once per interval, for the screen's warning
and the agent's status file.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Literal

from agent.datapath import check_privileges, open_pinned_maps, our_filters
from agent.errors import UserError
from agent.inventory import DockerInventory, connect_docker
from agent.model import Inventory
from agent.policy import Rule

State = Literal["enforced", "not-enforced", "pending"]


@dataclass(frozen=True)
class ContainerEnforcement:
    container: str
    state: State
    enforced_veths: int
    text: str  # what egress-rules prints
    # on its veths, since the datapath was loaded: packets its rules could not judge
    # (transport header out of reach), dropped as dropped_unparsed
    unparsed_dropped_packets: int = 0


def enforcement_states(
    rules: Collection[Rule],
    inventory: Inventory,
    filtered: Collection[int],
    tagged: Collection[int],
    unparsed_dropped: Mapping[int, int] | None = None,
) -> dict[str, ContainerEnforcement]:
    """Per container that has rules. filtered: veths with our tc filter; tagged: veths
    whose endpoint entry has the policy flag; unparsed_dropped: ifindex -> packets."""
    states = {}
    for name in sorted({rule.container for rule in rules}):
        container = inventory.find(name)
        if container is None or container.name != name:
            states[name] = ContainerEnforcement(name, "pending", 0, "pending: no such container running")
            continue
        veths = [ep.ifindex for ep in container.endpoints]
        live = [i for i in veths if i in filtered and i in tagged]
        unparsed = sum((unparsed_dropped or {}).get(i, 0) for i in veths)
        if not veths:
            why = container.why_not_observed or "no veth"
            text = f"container running but NOT enforced: {why}"
            states[name] = ContainerEnforcement(name, "not-enforced", 0, text)
        elif len(live) < len(veths):
            text = f"container running but NOT enforced on {len(veths) - len(live)} of {len(veths)} veths"
            states[name] = ContainerEnforcement(name, "not-enforced", len(live), text, unparsed)
        else:
            text = f"enforced on {len(live)} veths"
            states[name] = ContainerEnforcement(name, "enforced", len(live), text, unparsed)
    return states


def not_enforced(states: dict[str, ContainerEnforcement]) -> list[str]:
    return [name for name, state in states.items() if state.state == "not-enforced"]


def live_states(rules: Collection[Rule]) -> dict[str, ContainerEnforcement] | None:
    """For egress-rules: from Docker, the tc filters and the pinned maps as they are now;
    None when we may not read them (not root, no Docker)."""
    try:
        check_privileges()
        inventory = DockerInventory(connect_docker()).snapshot()
    except UserError:
        return None
    maps = open_pinned_maps()
    try:
        tagged = maps.policy_endpoints() if maps is not None else set()
        counters = maps.read_ifindex_counters() if maps is not None else {}
    finally:
        if maps is not None:
            maps.close()
    unparsed = {ifindex: counted.unparsed_dropped_packets for ifindex, counted in counters.items()}
    return enforcement_states(rules, inventory, set(our_filters()), tagged, unparsed)
