"""Which rule decides a packet: the reference model the datapath is tested against.

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
  fails (agent/policy/names.py). A container that receives other answers than the
  host (round-robin DNS, CDNs) is only matched where the answers overlap.
- protocol: ``tcp``, ``udp``, ``icmp`` (ICMP towards IPv4 destinations, ICMPv6
  towards IPv6 ones) or ``any`` (every IP protocol).
- port: the destination port; only with tcp, udp, or any (then: tcp and udp).

Adding a rule with the identity of an existing one (agent/policy/rules.py: RuleKey)
replaces that rule: it keeps its rule id, takes the new action and counts as the most
recently added (point 3). A rule added for a container that does not exist yet is
kept, marked pending, and applies as soon as a container with that name starts.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from agent.model import PROTO_NUMBERS
from agent.policy.rules import PORT_PROTOCOLS, Protocol, Rule


def port_protocols(rule: Rule) -> tuple[Protocol, ...]:
    """The protocols whose ports a rule with a port names."""
    return PORT_PROTOCOLS if rule.proto == "any" else (rule.proto,)


def protocol_number(proto: Protocol, family: int) -> int:
    """The IP protocol number a rule's protocol means towards one address family."""
    if proto == "icmp" and family == 6:
        return PROTO_NUMBERS["icmpv6"]
    return PROTO_NUMBERS[proto]


def _traffic_rank(rule: Rule, family: int, proto: int, dport: int | None) -> int | None:
    """How specifically rule matches the packet's protocol and port: 2 by port,
    1 by protocol only, 0 by neither (any traffic); None when it does not match."""
    if rule.port is not None:
        port_carrier = proto in (PROTO_NUMBERS[name] for name in port_protocols(rule))
        return 2 if port_carrier and dport == rule.port else None
    if rule.proto == "any":
        return 0
    return 1 if proto == protocol_number(rule.proto, family) else None


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
