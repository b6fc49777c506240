"""What a rule is, and the checks that turn user text into one.

A rule is identified by its container, destination, port and protocol (RuleKey); what
it does to matching traffic is agent/policy/semantics.py. Every front end (the CLI,
rule files, and later container labels) states rules as a RuleSpec: checked and
normalised here, before the store gives it an id, an age and its addresses.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal, NamedTuple, cast

from agent.errors import EXIT_USAGE, UserError

DestKind = Literal["cidr", "name"]
Protocol = Literal["tcp", "udp", "icmp", "any"]
Action = Literal["block", "allow"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp", "icmp", "any")
ACTIONS: tuple[Action, ...] = ("block", "allow")
PORT_PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp")

# Docker's own rule for container names (moby daemon/names: RestrictedNamePattern).
_CONTAINER_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.-]+")
_HOST_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_IPV4_CHARS = re.compile(r"[0-9.]+")
_DEST_FORMS = (
    "use an address (198.51.100.7, 2001:db8::7), a CIDR (198.51.100.0/24, 2001:db8::/32) "
    "or a host name (api.example.com)"
)


class RuleKey(NamedTuple):
    """What identifies a rule: a second rule with the same key replaces the first."""

    container: str
    dest: str
    port: int | None
    proto: Protocol


@dataclass(frozen=True)
class Rule:
    rule_id: int  # > 0, allocated by the store, never reused
    container: str  # container name
    dest: str  # normalised: a CIDR in canonical form or a lowercase host name
    dest_kind: DestKind
    port: int | None
    proto: Protocol
    action: Action
    added_at: str  # RFC 3339, UTC
    addresses: tuple[str, ...]  # CIDRs the rule matches: (dest,) for a cidr rule
    resolved_at: str | None = None  # last successful resolution of a name rule
    pending: bool = False  # no container had this name when last checked

    @property
    def key(self) -> RuleKey:
        return RuleKey(self.container, self.dest, self.port, self.proto)

    @property
    def networks(self) -> tuple[IPNetwork, ...]:
        return tuple(ipaddress.ip_network(address) for address in self.addresses)

    def summary(self) -> str:
        """One short phrase, e.g. "block 198.51.100.0/24 tcp/443"."""
        return f"{self.action} {self.dest} {traffic_text(self.proto, self.port)}"


@dataclass(frozen=True)
class RuleSpec:
    """A rule as a source states it (command line, rule file), checked and normalised."""

    key: RuleKey
    dest_kind: DestKind
    action: Action

    def to_rule(self, rule_id: int, added_at: str, name_addresses: tuple[str, ...], pending: bool) -> Rule:
        """The stored rule; name_addresses: what a name rule's host name resolved to at added_at."""
        name_rule = self.dest_kind == "name"
        return Rule(
            rule_id=rule_id,
            container=self.key.container,
            dest=self.key.dest,
            dest_kind=self.dest_kind,
            port=self.key.port,
            proto=self.key.proto,
            action=self.action,
            added_at=added_at,
            addresses=name_addresses if name_rule else (self.key.dest,),
            resolved_at=added_at if name_rule else None,
            pending=pending,
        )


# What a source states: container name -> its whole rule set, oldest first (agent/policy/apply.py).
DesiredRules = dict[str, list[RuleSpec]]


def rule_spec(container: str, dest: str, action: str, port: int | None, proto: str) -> RuleSpec:
    """A rule's identity and action, checked and normalised; UserError on bad input."""
    key, dest_kind = parse_key(container, dest, port, proto)
    return RuleSpec(key, dest_kind, check_action(action))


def parse_key(container: str, dest: str, port: int | None, proto: str) -> tuple[RuleKey, DestKind]:
    checked_proto = _check_proto(proto)
    _check_port(port, checked_proto)
    normalised_dest, dest_kind = parse_dest(dest)
    return RuleKey(check_container(container), normalised_dest, port, checked_proto), dest_kind


def traffic_text(proto: Protocol, port: int | None) -> str:
    if port is None:
        return proto
    return f"{'tcp+udp' if proto == 'any' else proto}/{port}"


# --- destinations -------------------------------------------------------------------


def parse_dest(text: str) -> tuple[str, DestKind]:
    """Normalise a destination: an address becomes a /32 or /128, a CIDR its canonical
    form, a host name lowercase without the trailing dot. UserError on anything else."""
    candidate = text.strip()
    if not candidate:
        raise _bad_dest(text, "it is empty")
    if "://" in candidate:
        raise _bad_dest(text, "that is a URL; give its host name alone")
    address_part, slash, _ = candidate.partition("/")
    if ":" in address_part:  # no host name has one
        if "%" in address_part:
            raise _bad_dest(text, "the datapath cannot match an IPv6 zone index (%...); drop it")
        return _parse_network(text, candidate, ipaddress.IPv6Network), "cidr"
    if _IPV4_CHARS.fullmatch(address_part):
        return _parse_network(text, candidate, ipaddress.IPv4Network), "cidr"
    if slash:
        raise _bad_dest(text, "a prefix length needs an IP address before the '/'")
    problem = _host_name_problem(candidate.removesuffix("."))
    if problem:
        raise _bad_dest(text, problem)
    return candidate.removesuffix(".").lower(), "name"


def _parse_network(
    text: str, candidate: str, network_class: type[ipaddress.IPv4Network] | type[ipaddress.IPv6Network]
) -> str:
    try:
        return str(ipv4_if_mapped(network_class(candidate, strict=True)))
    except ValueError as exc:
        strict_error = exc
    # Only host bits set make a CIDR fail strictly but parse loosely.
    try:
        network = network_class(candidate, strict=False)
    except ValueError:
        raise _bad_dest(text, str(strict_error)) from strict_error
    address = ipaddress.ip_address(candidate.partition("/")[0])
    raise UserError(
        f"invalid destination {text!r}: host bits are set; use the network {network}, "
        f"or {address} for that one address",
        EXIT_USAGE,
    )


_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")


def ipv4_if_mapped(network: IPNetwork) -> IPNetwork:
    """::ffff:a.b.c.d/n (n >= 96) is how IPv6 sockets spell IPv4 a.b.c.d/(n-96), and the
    packets on the wire are IPv4: stored as IPv6, the rule would never match them."""
    if isinstance(network, ipaddress.IPv6Network) and network.subnet_of(_IPV4_MAPPED):
        return ipaddress.IPv4Network((network.network_address.ipv4_mapped, network.prefixlen - 96))
    return network


def _host_name_problem(name: str) -> str | None:
    """Why name is not an RFC 1123 host name, or None if it is one."""
    if len(name) > 253:
        return "a host name has at most 253 characters"
    labels = name.split(".")
    for label in labels:
        if not label:
            return "it has an empty label (a leading dot or two dots in a row)"
        if len(label) > 63:
            return f"label {label[:16]}... is longer than 63 characters"
        if not _HOST_LABEL.fullmatch(label):
            return f"label {label!r} is not ASCII letters, digits and inner '-'"
    if labels[-1].isdigit():
        return "its last label is all digits, which no host name has"
    return None


def _bad_dest(text: str, reason: str) -> UserError:
    return UserError(f"invalid destination {text!r}: {reason}; {_DEST_FORMS}", EXIT_USAGE)


def normalise_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """Canonical CIDRs, IPv4 first, numerically sorted, without duplicates."""
    networks = {ipaddress.ip_network(address, strict=True) for address in addresses}
    ordered = sorted(networks, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    return tuple(str(network) for network in ordered)


# --- the other fields ---------------------------------------------------------------


def check_container(name: str) -> str:
    normalised = name.strip().removeprefix("/")
    if not _CONTAINER_NAME.fullmatch(normalised):
        raise UserError(
            f"invalid container name {name!r}: Docker names are a letter or digit followed by "
            "letters, digits, '_', '.' or '-'",
            EXIT_USAGE,
        )
    return normalised


def _check_proto(proto: str) -> Protocol:
    normalised = proto.strip().lower()
    if normalised in PROTOCOLS:
        return cast(Protocol, normalised)
    raise UserError(
        f"unknown protocol {proto!r}: use tcp, udp, icmp (ICMPv6 towards IPv6) or any", EXIT_USAGE
    )


def _check_port(port: int | None, proto: Protocol) -> None:
    if port is None:
        return
    if not 1 <= port <= 65535:
        raise UserError(f"port {port} is out of range: use 1-65535", EXIT_USAGE)
    if proto not in (*PORT_PROTOCOLS, "any"):
        raise UserError(
            f"a port needs protocol tcp, udp or any (tcp and udp), not {proto}: {proto} has no ports",
            EXIT_USAGE,
        )


def check_action(action: str) -> Action:
    if action in ACTIONS:
        return cast(Action, action)
    raise UserError(f"unknown action {action!r}: use block or allow", EXIT_USAGE)


def rfc3339(now: datetime | None) -> str:
    """A rule's timestamp: now (default: the current time) in UTC, to the second."""
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
