"""The endpoint, policy and rule-hit side of the pinned maps (mixed into Maps): what the
rule commands write and egress-rules reads. Layouts as in bpf/egress_maps.h."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.datapath.maps import DatapathConfig
    from agent.datapath.pinned import PinnedMap

ENDPOINT_F_POLICY = 1
RULE_KIND_PORT, RULE_KIND_PROTO, RULE_KIND_ANY = 1, 2, 4  # slot_rule_kinds bits
CONFIG_F_HOLD_UNKNOWN = 1
U32 = struct.Struct("=I")  # a __u32 key or value: ifindex, slot, rule id, kinds
_ENDPOINT = struct.Struct("=II")  # struct endpoint_info
_POLICY_KEY_HEAD = struct.Struct("=IIBBH")  # struct policy_lpm_key up to its address
_RULE_STATS = struct.Struct("=3Q")  # struct rule_stats


@dataclass(frozen=True)
class RuleHits:
    packets: int
    bytes: int
    last_hit_ns: int


class PolicyMaps:
    """Endpoints, the policy trie, slot_rule_kinds and rule hits; Maps opens the pins."""

    endpoints: PinnedMap
    policy: PinnedMap
    slot_rule_kinds: PinnedMap
    rule_stats: PinnedMap
    config: DatapathConfig

    def read_rule_hits(self) -> dict[int, RuleHits]:
        import numpy as np

        hits = {}
        for key, value in self.rule_stats.items():
            copies = np.frombuffer(value, "<u8").reshape(-1, _RULE_STATS.size // 8)
            packets, hit_bytes = copies[:, :2].sum(axis=0, dtype=np.uint64).tolist()
            hits[U32.unpack(key)[0]] = RuleHits(packets, hit_bytes, int(copies[:, 2].max()))
        return hits

    def set_endpoint(self, ifindex: int, slot: int, has_policy: bool) -> None:
        self.endpoints.update(U32.pack(ifindex), _ENDPOINT.pack(slot, ENDPOINT_F_POLICY if has_policy else 0))
        self._endpoints_changed()

    def _endpoints_changed(self) -> None:
        """After every write to endpoints, slot_rule_kinds, the policy trie or the hold flag:
        the datapath's per-CPU copies of them (struct veth_counters) and the verdicts its
        flow cache holds are read and judged again. A random new value rather than an
        increment, which two processes could both make to the same number."""
        generation = self.config.endpoints_generation
        while generation in (0, self.config.endpoints_generation):
            generation = int.from_bytes(os.urandom(4), "little")
        self.config.endpoints_generation = generation

    def set_hold_unknown(self, enabled: bool) -> None:
        """Drop IP packets of veths with no endpoint entry (held_* counters) until
        set_endpoint names them: enforcement from a container's first packet. The verdicts
        the flow cache holds were judged without the change: a new generation voids them."""
        self.config.flags = CONFIG_F_HOLD_UNKNOWN if enabled else 0
        self._endpoints_changed()

    def forget_endpoints(self, keep: Iterable[int]) -> None:
        """Drop endpoint entries of veths that are gone (ifindex values get reused)."""
        keep = set(keep)
        for key in self.endpoints.list_keys():
            if U32.unpack(key)[0] not in keep:
                self.endpoints.delete(key)
        self._endpoints_changed()

    def policy_endpoints(self) -> set[int]:
        return {
            U32.unpack(key)[0]
            for key, value in self.endpoints.items()
            if _ENDPOINT.unpack(value)[1] & ENDPOINT_F_POLICY
        }

    def sync_policy(self, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Make the trie hold exactly these (key bytes, value bytes) entries.

        New entries are written before stale ones are deleted, so a rule being
        replaced never leaves a gap in which its packets pass. The kinds of rule each
        slot has (slot_rule_kinds, which lookups the datapath makes) are widened
        before and narrowed after, for the same reason."""
        wanted = dict(entries)
        kinds = _rule_kinds(wanted)
        known = {U32.unpack(key)[0]: U32.unpack(value)[0] for key, value in self.slot_rule_kinds.items()}
        for slot in kinds.keys() | known.keys():
            widened = kinds.get(slot, 0) | known.get(slot, 0)
            if widened != known.get(slot):
                self.slot_rule_kinds.update(U32.pack(slot), U32.pack(widened))
        self._endpoints_changed()  # the wider kinds are in force before any new entry
        for key, value in wanted.items():
            self.policy.update(key, value)
        for key in self.policy.list_keys():
            if key not in wanted:
                self.policy.delete(key)
        for slot in known.keys() - kinds.keys():
            self.slot_rule_kinds.delete(U32.pack(slot))
        for slot, bits in kinds.items():
            if known.get(slot, 0) | bits != bits:  # widened above: narrow it to what is left
                self.slot_rule_kinds.update(U32.pack(slot), U32.pack(bits))
        self._endpoints_changed()

    def policy_entry_count(self) -> int:
        return len(self.policy.list_keys())


def _rule_kinds(entries: dict[bytes, bytes]) -> dict[int, int]:
    """slot -> RULE_KIND_* bits of the trie entries (struct policy_lpm_key)."""
    kinds: dict[int, int] = {}
    for key in entries:
        _, slot, proto, _, port = _POLICY_KEY_HEAD.unpack_from(key)
        kind = RULE_KIND_PORT if port else RULE_KIND_PROTO if proto else RULE_KIND_ANY
        kinds[slot] = kinds.get(slot, 0) | kind
    return kinds
