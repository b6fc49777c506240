"""rules.json, the store's document: its contents in memory, and to and from text.

The order of ``rules`` is the age order of point 3 (agent/policy/semantics.py). Each
container name with a rule has a *slot*, the small integer the datapath keys its
rules by. Reading refuses a document that is not exactly what this version writes,
so a hand edit or a newer egress-top's file is never half-understood.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field

from agent.policy.document import RULE_FIELDS, DocumentError, load_document, parse_rule_fields
from agent.policy.rules import Rule, RuleKey, normalise_addresses

STORE_VERSION = 1
_DOCUMENT_FIELDS = ("version", "next_rule_id", "slots", "rules")
# The fields parse_rule_fields does not check: what the store adds to a rule.
_STORED_FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "rule_id": (int,),
    "container": (str,),
    "dest_kind": (str,),
    "added_at": (str,),
    "addresses": (list,),
    "resolved_at": (str, type(None)),
    "pending": (bool,),
}
_RULE_FIELDS = {*_STORED_FIELD_TYPES, *RULE_FIELDS}


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


def render_document(contents: StoreContents) -> str:
    document = {
        "version": STORE_VERSION,
        "next_rule_id": contents.next_rule_id,
        "slots": contents.slots,
        "rules": [asdict(rule) for rule in contents.rules],
    }
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


def parse_document(text: str) -> StoreContents:
    """The contents of a rules.json; DocumentError says why it cannot be used."""
    document = load_document(text, version=STORE_VERSION, fields=_DOCUMENT_FIELDS)
    next_rule_id, slots, raw_rules = document["next_rule_id"], document["slots"], document["rules"]
    if type(next_rule_id) is not int or next_rule_id < 1:
        raise DocumentError(f"next_rule_id {next_rule_id!r} is not a positive integer")
    if not isinstance(slots, dict) or not all(type(s) is int and s >= 1 for s in slots.values()):
        raise DocumentError("slots is not an object of positive integers")
    if len(set(slots.values())) != len(slots):
        raise DocumentError("two containers share a slot")
    if not isinstance(raw_rules, list):
        raise DocumentError("rules is not a list")
    rules = [_parse_rule(raw) for raw in raw_rules]
    for position, rule in enumerate(rules):
        if rule.rule_id >= next_rule_id:
            raise DocumentError(f"rule {rule.rule_id} is not below next_rule_id {next_rule_id}")
        if rule.container not in slots:
            raise DocumentError(f"rule {rule.rule_id}: container {rule.container} has no slot")
        for earlier in rules[:position]:
            if earlier.rule_id == rule.rule_id or earlier.key == rule.key:
                raise DocumentError(f"rules {earlier.rule_id} and {rule.rule_id} collide")
    return StoreContents(rules=rules, slots=dict(slots), next_rule_id=next_rule_id)


def _parse_rule(raw: object) -> Rule:
    if not isinstance(raw, dict) or set(raw) != _RULE_FIELDS:
        raise DocumentError(f"a rule does not have exactly the fields {sorted(_RULE_FIELDS)}")
    label = f"rule {raw['rule_id']!r}"
    for name, types in _STORED_FIELD_TYPES.items():
        # Exact types, as parse_rule_fields checks the others.
        if type(raw[name]) not in types:
            raise DocumentError(f"{label}: {name} is {raw[name]!r}")
    if raw["rule_id"] < 1:
        raise DocumentError(f"{label}: rule_id must be positive")
    if not all(type(address) is str for address in raw["addresses"]):
        raise DocumentError(f"{label}: addresses must be strings")
    spec = parse_rule_fields(label, raw["container"], raw)
    try:
        addresses = normalise_addresses(raw["addresses"])
    except ValueError as exc:
        raise DocumentError(f"{label}: {exc}") from exc
    rule = Rule(**{**raw, "addresses": tuple(raw["addresses"])})
    if rule.key != spec.key or rule.dest_kind != spec.dest_kind:
        raise DocumentError(f"{label}: not in normal form (expected {spec.key.dest} as {spec.dest_kind})")
    name_rule = spec.dest_kind == "name"
    if rule.addresses != addresses or not addresses or (not name_rule and addresses != (spec.key.dest,)):
        raise DocumentError(f"{label}: addresses {list(rule.addresses)} do not fit its destination")
    return rule
