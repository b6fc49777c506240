"""Host-name rules: what the host resolves a name to, and keeping that fresh.

A name rule matches every A and AAAA address the host resolved its name to. The agent
re-resolves periodically; a name that fails to resolve keeps its previous addresses,
so a DNS outage never silently lifts a block.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.errors import EXIT_USAGE, UserError
from agent.policy.rules import Rule, ipv4_if_mapped, normalise_addresses

if TYPE_CHECKING:  # the store resolves through this module: a type, not an import cycle
    from agent.policy.store import RuleStore

# socket.getaddrinfo's shape: (host, port) -> [(family, type, proto, canonname, sockaddr)]
Resolver = Callable[[str, None], Iterable[tuple[Any, ...]]]


def resolve(name: str, resolver: Resolver = socket.getaddrinfo) -> tuple[str, ...]:
    """Every A and AAAA address of name, as sorted /32 and /128 CIDRs."""
    try:
        answers = resolver(name, None)
    except OSError as exc:
        raise UserError(f"cannot resolve {name}: {exc.strerror or exc}", EXIT_USAGE) from exc
    # An IPv6 link-local answer carries its zone ("fe80::1%eth0"); the datapath cannot.
    addresses = [
        ipaddress.ip_address(sockaddr[0].partition("%")[0])
        for family, _type, _proto, _canonname, sockaddr in answers
        if family in (socket.AF_INET, socket.AF_INET6)
    ]
    if not addresses:
        raise UserError(f"cannot resolve {name}: no A or AAAA records", EXIT_USAGE)
    return normalise_addresses(str(ipv4_if_mapped(ipaddress.ip_network(address))) for address in addresses)


@dataclass(frozen=True)
class RefreshResult:
    changed: list[Rule]  # name rules whose addresses changed, as they are now
    failed: dict[str, str]  # name -> why it did not resolve (its rules kept their addresses)


def refresh_names(
    store: RuleStore, resolver: Resolver = socket.getaddrinfo, now: datetime | None = None
) -> RefreshResult:
    """Re-resolve every host name in the store; resolution happens outside the lock."""
    names = sorted({rule.dest for rule in store.rules() if rule.dest_kind == "name"})
    resolved: dict[str, tuple[str, ...]] = {}
    failed: dict[str, str] = {}
    for name in names:
        try:
            resolved[name] = resolve(name, resolver)
        except UserError as exc:
            failed[name] = str(exc)
    changed = store.update_addresses(resolved, now) if resolved else []
    return RefreshResult(changed=changed, failed=failed)
