"""Rules -> the plain entries of the datapath's policy LPM trie (bpf/egress_maps.h).

The datapath knows nothing of rules: it is handed these entries, keyed by slot, and
agent/datapath/maps.py writes them. Each entry mirrors struct policy_lpm_key ->
struct policy_rule.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agent.model import PROTO_NUMBERS
from agent.policy.rules import Action, Rule
from agent.policy.semantics import port_protocols, protocol_number

# Mirrors of bpf/egress_maps.h.
POLICY_KEY_FIXED_BITS = 64
POLICY_ALLOW = 0
POLICY_DROP = 1
_ACTION_CODES: dict[Action, int] = {"allow": POLICY_ALLOW, "block": POLICY_DROP}
# Native byte order, standard sizes, no padding: the C structs have none.
POLICY_LPM_KEY_STRUCT = struct.Struct("=IIBBH16s")  # prefixlen, slot, proto, family, port, addr
POLICY_RULE_STRUCT = struct.Struct("=IBBH")  # rule_id, action, addr_prefixlen, pad


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
        return POLICY_LPM_KEY_STRUCT.pack(prefixlen, self.slot, self.proto, self.family, self.port, self.addr)

    def value_bytes(self) -> bytes:
        return POLICY_RULE_STRUCT.pack(self.rule_id, self.action, self.addr_prefixlen, 0)


def _datapath_traffic(rule: Rule, family: int) -> list[tuple[int, int]]:
    """The (proto, port) pairs a rule's keys carry for its addresses of one family."""
    if rule.port is not None:
        return [(PROTO_NUMBERS[name], rule.port) for name in port_protocols(rule)]
    if rule.proto == "any":
        return [(0, 0)]
    return [(protocol_number(rule.proto, family), 0)]


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
