"""Declarative rules: make named containers' rule sets exactly what a source states.

A source (a rule file today; container labels can be another) states DesiredRules:
container name -> its whole rule set, oldest first. Applying makes each *named*
container's rules exactly that list, in that order: later entries count as newer, so
they win ties (point 3 of agent/policy/semantics.py). An empty list removes a
container's rules; a container the source does not name keeps its own. A rule already
in the store with the same identity and action is kept as it is (id, age, resolved
addresses), so applying the same rules again changes nothing.
"""

from __future__ import annotations

import difflib
import socket
from collections.abc import Collection, Mapping
from dataclasses import replace
from datetime import datetime

from agent.policy.names import Resolver, resolve
from agent.policy.rules import DesiredRules, Rule, RuleSpec, rfc3339
from agent.policy.store import RuleStore
from agent.policy.store_document import StoreContents


def resolve_names(desired: DesiredRules, resolver: Resolver) -> dict[str, tuple[str, ...]]:
    """Addresses of every host name the rules name: resolved before the store is locked,
    and a name that does not resolve fails the whole apply."""
    names = {rule.key.dest for rules in desired.values() for rule in rules if rule.dest_kind == "name"}
    return {name: resolve(name, resolver) for name in sorted(names)}


def apply_to(
    contents: StoreContents,
    desired: DesiredRules,
    addresses_of: Mapping[str, tuple[str, ...]],
    running: Collection[str],
    now: str,
) -> list[str]:
    """Make each named container's rules in contents exactly the desired ones; returns
    the diff ('-'/'+' lines), empty when nothing changed. now: RFC 3339 for new rules."""
    diff: list[str] = []
    for container, wanted in desired.items():
        current = contents.rules_of(container)
        if [(r.key, r.action) for r in current] == [(w.key, w.action) for w in wanted]:
            continue
        existing = {rule.key: rule for rule in current}
        contents.rules = [rule for rule in contents.rules if rule.container != container]
        if wanted:
            contents.ensure_slot(container)
        for want in wanted:
            contents.rules.append(
                _rule_for(contents, want, existing.get(want.key), addresses_of, running, now)
            )
        diff += _diff_lines(container, current, contents.rules_of(container))
    contents.free_unused_slots()
    return diff


def _rule_for(
    contents: StoreContents,
    want: RuleSpec,
    existing: Rule | None,
    addresses_of: Mapping[str, tuple[str, ...]],
    running: Collection[str],
    now: str,
) -> Rule:
    if existing is not None and existing.action == want.action:
        return existing
    if existing is not None:
        return replace(existing, action=want.action, added_at=now)
    name_addresses = addresses_of[want.key.dest] if want.dest_kind == "name" else ()
    pending = want.key.container not in running
    return want.to_rule(contents.allocate_rule_id(), now, name_addresses, pending)


def _diff_lines(container: str, before: list[Rule], after: list[Rule]) -> list[str]:
    """A unified diff without context: order matters (later rules win ties), so a moved
    rule shows as removed and added."""
    lines = difflib.unified_diff(
        [rule.summary() for rule in before], [rule.summary() for rule in after], n=0, lineterm=""
    )
    return [
        f"{line[0]} {container}: {line[1:]}"
        for line in lines
        if line[:1] in "+-" and line[:3] not in ("+++", "---")
    ]


def apply_rule_file(
    store: RuleStore,
    desired: DesiredRules,
    running: Collection[str],
    dry_run: bool = False,
    resolver: Resolver = socket.getaddrinfo,
    now: datetime | None = None,
) -> list[str]:
    """Apply in one store transaction (all or nothing); with dry_run, to a copy only."""
    addresses_of = resolve_names(desired, resolver)
    stamp = rfc3339(now)
    if dry_run:
        return apply_to(store.load(), desired, addresses_of, running, stamp)
    with store.transaction() as contents:
        return apply_to(contents, desired, addresses_of, running, stamp)
