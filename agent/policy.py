"""Egress rules: what they mean, where they are kept, and what the datapath is told.

Matching semantics
------------------
Rules belong to a container *name*, so they follow a container re-created with the
same name (compose up, restart policies, image upgrades). For each packet a container
sends, the most specific matching rule decides:

1. the longest destination prefix wins: a /32 beats a /24, which beats 0.0.0.0/0;
2. at the same prefix length, a rule with a port beats a rule with only a protocol,
   which beats a rule with neither;
3. rules still tied (``--port 53`` next to ``--proto udp --port 53``, or a host name
   and an address that resolve to the same address) are settled by age: the rule
   added, or re-added, most recently wins.

A packet no rule matches is allowed. So ``block 0.0.0.0/0`` plus ``block ::/0`` plus
a few ``allow`` rules is an allow-list, and an ``allow`` for an address inside a
blocked CIDR opens a hole in it. The prefix is compared first: with
``allow 10.0.0.0/8 tcp/443`` and ``block 10.1.2.3``, tcp to 10.1.2.3:443 is blocked.

What a rule matches:

- destination: an address (stored as a /32 or /128), a CIDR, or a host name. A host
  name stands for every A and AAAA address the *host* resolved it to; the agent
  re-resolves names periodically and keeps the previous addresses while resolution
  fails. A container that receives other answers than the host (round-robin DNS,
  CDNs) is only matched where the answers overlap.
- protocol: ``tcp``, ``udp``, ``icmp`` (ICMP towards IPv4 destinations, ICMPv6
  towards IPv6 ones) or ``any`` (every IP protocol).
- port: the destination port; only with tcp, udp, or any (then: tcp and udp).

A rule is identified by its container, destination, port and protocol. Adding a rule
with the identity of an existing one replaces that rule: it keeps its rule id, takes
the new action and counts as the most recently added (point 3). A rule added for a
container that does not exist yet is kept, marked pending, and applies as soon as a
container with that name starts.

Store
-----
Rules live in ``$EGRESS_TOP_STATE_DIR/rules.json`` (default /var/lib/egress-top), an
indented JSON document guarded by ``rules.lock`` (flock: exclusive to write, shared
to read, every wait bounded: agent/lockfile.py) and replaced atomically on every
change, so parallel ``egress-block`` runs all land and a crash leaves either the old
or the new file. Policy is sensitive: the directory is 0700, its files 0600. The order of ``rules``
in it is the age order of point 3. Each container name gets a *slot*, the small
integer the datapath keys its rules by; a slot is kept after the container's last
rule goes and never handed to another name, so an endpoint still tagged with it
can never pick up someone else's rules.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import os
import re
import socket
import struct
import tempfile
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, NamedTuple, cast

from agent.errors import EXIT_PERMISSION, EXIT_STORE, EXIT_USAGE, UserError
from agent.lockfile import bounded_lock, private_dir
from agent.model import PROTO_NUMBERS

DestKind = Literal["cidr", "name"]
Protocol = Literal["tcp", "udp", "icmp", "any"]
Action = Literal["block", "allow"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
# socket.getaddrinfo's shape: (host, port) -> [(family, type, proto, canonname, sockaddr)]
Resolver = Callable[[str, None], Iterable[tuple[Any, ...]]]

PROTOCOLS: tuple[Protocol, ...] = ("tcp", "udp", "icmp", "any")
ACTIONS: tuple[Action, ...] = ("block", "allow")
_PORT_PROTOCOLS = ("tcp", "udp")

STATE_DIR_ENV = "EGRESS_TOP_STATE_DIR"
DEFAULT_STATE_DIR = Path("/var/lib/egress-top")
STORE_VERSION = 1

# Mirrors of bpf/egress_maps.h.
POLICY_KEY_FIXED_BITS = 64
POLICY_ALLOW = 0
POLICY_DROP = 1
_ACTION_CODES: dict[Action, int] = {"allow": POLICY_ALLOW, "block": POLICY_DROP}
# Native byte order, standard sizes, no padding: the C structs have none.
_POLICY_LPM_KEY = struct.Struct("=IIBBH16s")  # prefixlen, slot, proto, family, port, addr
_POLICY_RULE = struct.Struct("=IBBH")  # rule_id, action, addr_prefixlen, pad

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
        return f"{self.action} {self.dest} {_traffic_text(self.proto, self.port)}"


def _traffic_text(proto: Protocol, port: int | None) -> str:
    if port is None:
        return proto
    return f"{'tcp+udp' if proto == 'any' else proto}/{port}"


# --- validation ---------------------------------------------------------------------


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
        return str(_ipv4_if_mapped(network_class(candidate, strict=True)))
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


def _ipv4_if_mapped(network: IPNetwork) -> IPNetwork:
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


def _check_container(name: str) -> str:
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
    if proto not in (*_PORT_PROTOCOLS, "any"):
        raise UserError(
            f"a port needs protocol tcp, udp or any (tcp and udp), not {proto}: {proto} has no ports",
            EXIT_USAGE,
        )


def _check_action(action: str) -> Action:
    if action in ACTIONS:
        return cast(Action, action)
    raise UserError(f"unknown action {action!r}: use block or allow", EXIT_USAGE)


def _parse_key(container: str, dest: str, port: int | None, proto: str) -> tuple[RuleKey, DestKind]:
    checked_proto = _check_proto(proto)
    _check_port(port, checked_proto)
    normalised_dest, dest_kind = parse_dest(dest)
    return RuleKey(_check_container(container), normalised_dest, port, checked_proto), dest_kind


def checked_rule(
    container: str, dest: str, action: str, port: int | None, proto: str
) -> tuple[RuleKey, DestKind, Action]:
    """A rule's identity and action, checked and normalised as add() does (for rule files)."""
    key, dest_kind = _parse_key(container, dest, port, proto)
    return key, dest_kind, _check_action(action)


def _normalise_addresses(addresses: Iterable[str]) -> tuple[str, ...]:
    """Canonical CIDRs, IPv4 first, numerically sorted, without duplicates."""
    networks = {ipaddress.ip_network(address, strict=True) for address in addresses}
    ordered = sorted(networks, key=lambda n: (n.version, int(n.network_address), n.prefixlen))
    return tuple(str(network) for network in ordered)


def _rfc3339(now: datetime | None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- name resolution ----------------------------------------------------------------


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
    return _normalise_addresses(str(_ipv4_if_mapped(ipaddress.ip_network(address))) for address in addresses)


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


# --- matching -----------------------------------------------------------------------


def _port_protocols(rule: Rule) -> tuple[str, ...]:
    """The protocols whose ports a rule with a port names."""
    return _PORT_PROTOCOLS if rule.proto == "any" else (rule.proto,)


def _protocol_number(proto: Protocol, family: int) -> int:
    if proto == "icmp" and family == 6:
        return PROTO_NUMBERS["icmpv6"]
    return PROTO_NUMBERS[proto]


def _traffic_rank(rule: Rule, family: int, proto: int, dport: int | None) -> int | None:
    """How specifically rule matches the packet's protocol and port: 2 by port,
    1 by protocol only, 0 by neither (any traffic); None when it does not match."""
    if rule.port is not None:
        port_carrier = proto in (PROTO_NUMBERS[name] for name in _port_protocols(rule))
        return 2 if port_carrier and dport == rule.port else None
    if rule.proto == "any":
        return 0
    return 1 if proto == _protocol_number(rule.proto, family) else None


def winning_rule(rules: Sequence[Rule], dst: str, proto: int, dport: int | None) -> Rule | None:
    """The rule that decides a packet to dst (IP protocol proto, destination port dport
    for tcp/udp) among one container's rules, in store order; None: allowed."""
    address = ipaddress.ip_address(dst)
    best: tuple[int, int, int] | None = None
    winner: Rule | None = None
    for age, rule in enumerate(rules):
        rank = _traffic_rank(rule, address.version, proto, dport)
        if rank is None:
            continue
        for network in rule.networks:
            specificity = (network.prefixlen, rank, age)
            if address in network and (best is None or specificity > best):
                best, winner = specificity, rule
    return winner


# --- compilation to the datapath ----------------------------------------------------


@dataclass(frozen=True)
class LpmEntry:
    """One element of the policy LPM trie: struct policy_lpm_key -> struct policy_rule."""

    family: int  # 4 or 6
    slot: int
    proto: int  # 0: any protocol
    port: int  # 0: any port
    addr: bytes  # network bytes of the prefix: 4 or 16
    addr_prefixlen: int
    rule_id: int
    action: int  # POLICY_ALLOW or POLICY_DROP

    def key_bytes(self) -> bytes:
        prefixlen = POLICY_KEY_FIXED_BITS + self.addr_prefixlen
        # struct.pack zero-fills an IPv4 address to 16 bytes, as the datapath keys it.
        return _POLICY_LPM_KEY.pack(prefixlen, self.slot, self.proto, self.family, self.port, self.addr)

    def value_bytes(self) -> bytes:
        return _POLICY_RULE.pack(self.rule_id, self.action, self.addr_prefixlen, 0)


def _datapath_traffic(rule: Rule, family: int) -> list[tuple[int, int]]:
    """The (proto, port) pairs a rule's keys carry for its addresses of one family."""
    if rule.port is not None:
        return [(PROTO_NUMBERS[name], rule.port) for name in _port_protocols(rule)]
    if rule.proto == "any":
        return [(0, 0)]
    return [(_protocol_number(rule.proto, family), 0)]


def lpm_entries(rules: Sequence[Rule], slot_of: Mapping[str, int]) -> list[LpmEntry]:
    """Compile rules (in store order) to policy trie entries.

    Per packet the datapath looks up (slot, proto, family, dport) when the packet has a
    destination port, then (slot, proto, family, 0), then (slot, 0, family, 0), and
    keeps the match with the largest addr_prefixlen, ties going to the earlier lookup. Each
    key appears once: when rules collide on one, the later rule's entry is kept, which
    is winning_rule's age tie-break. Every rule's container must be in slot_of.
    """
    entries: dict[bytes, LpmEntry] = {}
    for rule in rules:
        for network in rule.networks:
            for proto, port in _datapath_traffic(rule, network.version):
                entry = LpmEntry(
                    family=network.version,
                    slot=slot_of[rule.container],
                    proto=proto,
                    port=port,
                    addr=network.network_address.packed,
                    addr_prefixlen=network.prefixlen,
                    rule_id=rule.rule_id,
                    action=_ACTION_CODES[rule.action],
                )
                entries[entry.key_bytes()] = entry
    return list(entries.values())


# --- store --------------------------------------------------------------------------


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


@dataclass
class StoreContents:
    """The store's document; mutate it inside RuleStore.transaction()."""

    rules: list[Rule] = field(default_factory=list)  # oldest first
    slots: dict[str, int] = field(default_factory=dict)
    next_rule_id: int = 1

    def find(self, key: RuleKey) -> Rule | None:
        return next((rule for rule in self.rules if rule.key == key), None)

    def rules_of(self, container: str) -> list[Rule]:
        return [rule for rule in self.rules if rule.container == container]

    def allocate_rule_id(self) -> int:
        rule_id = self.next_rule_id
        self.next_rule_id += 1
        return rule_id

    def ensure_slot(self, container: str) -> int:
        # A freed number may be given again: each sync rewrites the trie and every running
        # container's tag together, so an old tag never carries another name's rules on.
        if container not in self.slots:
            self.slots[container] = max(self.slots.values(), default=0) + 1
        return self.slots[container]

    def free_unused_slots(self) -> None:
        """A name no rule names keeps no slot (the store would otherwise grow forever)."""
        named = {rule.container for rule in self.rules}
        self.slots = {name: slot for name, slot in self.slots.items() if name in named}

    def replace_rules(self, updated: Mapping[int, Rule]) -> None:
        """Swap rules by rule_id, keeping their place in the age order."""
        self.rules = [updated.get(rule.rule_id, rule) for rule in self.rules]


class _Corrupt(Exception):
    """Why a store document cannot be used."""


class RuleStore:
    def __init__(self, state_dir: Path | None = None, lock_timeout: float | None = None):
        self.state_dir = state_dir or default_state_dir()
        self.path = self.state_dir / "rules.json"
        self.lock_path = self.state_dir / "rules.lock"
        self.lock_timeout = lock_timeout  # None: EGRESS_TOP_LOCK_TIMEOUT or lockfile's default

    # -- reading and writing

    def load(self) -> StoreContents:
        """A consistent snapshot: use it when rules and slots must agree (lpm_entries)."""
        if not self.state_dir.is_dir():
            return StoreContents()
        with self._locked(fcntl.LOCK_SH):
            return self._decode(self._read_text())

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StoreContents]:
        """Read-modify-write under the exclusive lock. The document is written back,
        atomically, only if the block finishes without an exception and changed it."""
        with self._io_errors("create"):
            private_dir(self.state_dir, owner=os.geteuid())
        with self._locked(fcntl.LOCK_EX):
            before = self._read_text()
            contents = self._decode(before)
            yield contents
            after = _render_document(contents)
            if after != before:
                self._write_atomically(after)

    @contextlib.contextmanager
    def _locked(self, operation: int) -> Iterator[None]:
        exclusive = operation == fcntl.LOCK_EX
        with (
            self._io_errors("open"),
            bounded_lock(self.lock_path, f"rule store {self.path}", exclusive, self.lock_timeout),
        ):
            yield

    def _read_text(self) -> str | None:
        with self._io_errors("read"):
            try:
                raw = self.path.read_bytes()
            except FileNotFoundError:
                return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self._unusable(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc

    def _write_atomically(self, text: str) -> None:
        with self._io_errors("write"):
            fd, temp_name = tempfile.mkstemp(dir=self.state_dir, prefix=".rules.json.", suffix=".tmp")
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as temp:
                    temp.write(text)
                    temp.flush()
                    os.fsync(temp.fileno())
                os.replace(temp_name, self.path)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(temp_name)
                raise
            # The rename is durable only once the directory itself is on disk.
            dir_fd = os.open(self.state_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    @contextlib.contextmanager
    def _io_errors(self, verb: str) -> Iterator[None]:
        try:
            yield
        except PermissionError as exc:
            raise UserError(
                f"cannot {verb} {exc.filename or self.state_dir}: permission denied; run as root, "
                f"or point {STATE_DIR_ENV} at a directory you own",
                EXIT_PERMISSION,
            ) from exc
        except OSError as exc:
            raise UserError(
                f"cannot {verb} {exc.filename or self.state_dir}: {exc.strerror or exc}", EXIT_STORE
            ) from exc

    def _unusable(self, reason: str) -> UserError:
        return UserError(
            f"cannot use rule store {self.path}: {reason}; it was left as it is: "
            "fix it, or move it aside to start with no rules",
            EXIT_STORE,
        )

    def _decode(self, text: str | None) -> StoreContents:
        if text is None:
            return StoreContents()
        try:
            return _parse_document(text)
        except _Corrupt as exc:
            raise self._unusable(str(exc)) from exc

    # -- operations

    def add(
        self,
        container: str,
        dest: str,
        *,
        action: str,
        port: int | None = None,
        proto: str = "any",
        pending: bool = False,
        resolver: Resolver = socket.getaddrinfo,
        now: datetime | None = None,
    ) -> tuple[Rule, bool]:
        """Add a rule, or replace the one with the same key (then True): see the module doc.
        A host name is resolved first, outside the lock; failing to resolve adds nothing."""
        key, dest_kind = _parse_key(container, dest, port, proto)
        checked_action = _check_action(action)
        added_at = _rfc3339(now)
        if dest_kind == "name":
            addresses, resolved_at = resolve(key.dest, resolver), added_at
        else:
            addresses, resolved_at = (key.dest,), None
        with self.transaction() as contents:
            existing = contents.find(key)
            if existing is not None:
                # Re-adding makes it the newest rule: it goes to the end of the age order.
                contents.rules.remove(existing)
            contents.ensure_slot(key.container)
            rule = Rule(
                rule_id=existing.rule_id if existing else contents.allocate_rule_id(),
                container=key.container,
                dest=key.dest,
                dest_kind=dest_kind,
                port=key.port,
                proto=key.proto,
                action=checked_action,
                added_at=added_at,
                addresses=addresses,
                resolved_at=resolved_at,
                pending=pending,
            )
            contents.rules.append(rule)
        return rule, existing is not None

    def remove(self, container: str, dest: str, port: int | None = None, proto: str = "any") -> Rule:
        """Remove the rule with exactly this key, whatever its action."""
        key, _ = _parse_key(container, dest, port, proto)
        with self.transaction() as contents:
            rule = contents.find(key)
            if rule is None:
                raise UserError(_no_such_rule(key, contents.rules_of(key.container)), EXIT_USAGE)
            contents.rules.remove(rule)
            contents.free_unused_slots()
        return rule

    def remove_all(self, container: str) -> list[Rule]:
        name = _check_container(container)
        with self.transaction() as contents:
            removed = contents.rules_of(name)
            contents.rules = [rule for rule in contents.rules if rule.container != name]
            contents.free_unused_slots()
        return removed

    def rules(self, container: str | None = None) -> list[Rule]:
        """Rules in age order (oldest first), all or one container's."""
        rules = self.load().rules
        if container is None:
            return rules
        name = _check_container(container)
        return [rule for rule in rules if rule.container == name]

    def slots(self) -> dict[str, int]:
        return self.load().slots

    def update_addresses(
        self, resolved: Mapping[str, Iterable[str]], now: datetime | None = None
    ) -> list[Rule]:
        """Give the name rules of each resolved name its new addresses and resolved_at;
        returns the rules whose addresses changed. Names not in resolved keep theirs."""
        new_addresses = {name: _normalise_addresses(addresses) for name, addresses in resolved.items()}
        if not all(new_addresses.values()):
            # An empty list would leave a rule matching nothing, and a store that refuses to load.
            raise ValueError("a resolved name needs at least one address")
        resolved_at = _rfc3339(now)
        with self.transaction() as contents:
            before = {
                rule.rule_id: rule
                for rule in contents.rules
                if rule.dest_kind == "name" and rule.dest in new_addresses
            }
            refreshed = {
                rule_id: replace(rule, addresses=new_addresses[rule.dest], resolved_at=resolved_at)
                for rule_id, rule in before.items()
            }
            contents.replace_rules(refreshed)
        return [rule for rule_id, rule in refreshed.items() if rule.addresses != before[rule_id].addresses]

    def sync_pending(self, existing_containers: Collection[str]) -> list[Rule]:
        """Mark rules pending exactly when no container of theirs exists; returns the
        rules whose mark changed. Writes nothing if none did."""
        with self.transaction() as contents:
            flipped = {
                rule.rule_id: replace(rule, pending=not rule.pending)
                for rule in contents.rules
                if rule.pending == (rule.container in existing_containers)
            }
            contents.replace_rules(flipped)
        return list(flipped.values())


def _no_such_rule(key: RuleKey, container_rules: Sequence[Rule]) -> str:
    wanted = f"no rule for {key.container} matches {key.dest} {_traffic_text(key.proto, key.port)}"
    if not container_rules:
        return f"{wanted}; {key.container} has no rules"
    shown = ", ".join(rule.summary() for rule in container_rules[:5])
    more = f" and {len(container_rules) - 5} more" if len(container_rules) > 5 else ""
    return f"{wanted}; {key.container} has: {shown}{more}"


# --- the document on disk -----------------------------------------------------------

_DOCUMENT_FIELDS = {"version", "next_rule_id", "slots", "rules"}
_RULE_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "rule_id": (int,),
    "container": (str,),
    "dest": (str,),
    "dest_kind": (str,),
    "port": (int, type(None)),
    "proto": (str,),
    "action": (str,),
    "added_at": (str,),
    "addresses": (list,),
    "resolved_at": (str, type(None)),
    "pending": (bool,),
}


def _render_document(contents: StoreContents) -> str:
    document = {
        "version": STORE_VERSION,
        "next_rule_id": contents.next_rule_id,
        "slots": contents.slots,
        "rules": [asdict(rule) for rule in contents.rules],
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def _parse_document(text: str) -> StoreContents:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Corrupt(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    if not isinstance(document, dict):
        raise _Corrupt("not a JSON object")
    version = document.get("version")
    if version != STORE_VERSION:
        if type(version) is int and version > STORE_VERSION:
            raise _Corrupt(f"it was written by a newer egress-top (format version {version})")
        raise _Corrupt(f"format version {version!r}, expected {STORE_VERSION}")
    if set(document) != _DOCUMENT_FIELDS:
        raise _Corrupt(f"top-level fields {sorted(document)}, expected {sorted(_DOCUMENT_FIELDS)}")
    next_rule_id, slots, raw_rules = document["next_rule_id"], document["slots"], document["rules"]
    if type(next_rule_id) is not int or next_rule_id < 1:
        raise _Corrupt(f"next_rule_id {next_rule_id!r} is not a positive integer")
    if not isinstance(slots, dict) or not all(type(s) is int and s >= 1 for s in slots.values()):
        raise _Corrupt("slots is not an object of positive integers")
    if len(set(slots.values())) != len(slots):
        raise _Corrupt("two containers share a slot")
    if not isinstance(raw_rules, list):
        raise _Corrupt("rules is not a list")
    rules = [_parse_rule(raw) for raw in raw_rules]
    for position, rule in enumerate(rules):
        if rule.rule_id >= next_rule_id:
            raise _Corrupt(f"rule {rule.rule_id} is not below next_rule_id {next_rule_id}")
        if rule.container not in slots:
            raise _Corrupt(f"rule {rule.rule_id}: container {rule.container} has no slot")
        for earlier in rules[:position]:
            if earlier.rule_id == rule.rule_id or earlier.key == rule.key:
                raise _Corrupt(f"rules {earlier.rule_id} and {rule.rule_id} collide")
    return StoreContents(rules=rules, slots=dict(slots), next_rule_id=next_rule_id)


def _parse_rule(raw: object) -> Rule:
    if not isinstance(raw, dict) or set(raw) != set(_RULE_FIELD_TYPES):
        raise _Corrupt(f"a rule does not have exactly the fields {sorted(_RULE_FIELD_TYPES)}")
    label = f"rule {raw['rule_id']!r}"
    for name, types in _RULE_FIELD_TYPES.items():
        # Exact types: JSON true is not a port, and 443.0 is not one either.
        if type(raw[name]) not in types:
            raise _Corrupt(f"{label}: {name} is {raw[name]!r}")
    if raw["rule_id"] < 1:
        raise _Corrupt(f"{label}: rule_id must be positive")
    if not all(type(address) is str for address in raw["addresses"]):
        raise _Corrupt(f"{label}: addresses must be strings")
    try:
        key, dest_kind = _parse_key(raw["container"], raw["dest"], raw["port"], raw["proto"])
        _check_action(raw["action"])
        addresses = _normalise_addresses(raw["addresses"])
    except (UserError, ValueError) as exc:
        raise _Corrupt(f"{label}: {exc}") from exc
    rule = Rule(**{**raw, "addresses": tuple(raw["addresses"])})
    if rule.key != key or rule.dest_kind != dest_kind:
        raise _Corrupt(f"{label}: not in normal form (expected {key.dest} as {dest_kind})")
    if rule.addresses != addresses or not addresses or (dest_kind == "cidr" and addresses != (key.dest,)):
        raise _Corrupt(f"{label}: addresses {list(rule.addresses)} do not fit its destination")
    return rule
