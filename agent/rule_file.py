"""Rule files: one declarative document with a fleet's rules (`egress-rules apply FILE`).

Format, version 1 (schema/rules-file.v1.json), JSON::

    {"version": 1,
     "containers": {
       "web": [{"action": "block", "dest": "198.51.100.0/24", "port": 443, "proto": "tcp"},
               {"action": "allow", "dest": "198.51.100.7"}],
       "old-job": []}}

or the same in TOML when the file name ends in ``.toml``::

    version = 1
    [[containers.web]]
    action = "block"
    dest = "198.51.100.0/24"

A rule has ``action`` (block/allow) and ``dest`` (address, CIDR or host name), and
optionally ``port`` and ``proto`` (default any): the meaning of agent/policy.py.

Applying a file makes each *named* container's rules exactly its list, in that order:
later entries count as newer, so they win ties (point 3 of agent/policy.py). An empty
list removes a container's rules; a container the file does not name keeps its own.
A rule already in the store with the same identity and action is kept as it is (id,
age, resolved addresses), so applying the same file again changes nothing. Unknown
fields are refused, not ignored: a later version (learned allow-lists) adds fields
under a new version number.
"""

from __future__ import annotations

import difflib
import json
import socket
import tomllib
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

from agent.errors import EXIT_USAGE, UserError
from agent.policy import (
    Action,
    DestKind,
    Resolver,
    Rule,
    RuleKey,
    RuleStore,
    StoreContents,
    checked_rule,
    resolve,
)

RULE_FILE_VERSION = 1
_RULE_FIELDS = {"action", "dest", "port", "proto"}
_REQUIRED_FIELDS = {"action", "dest"}


@dataclass(frozen=True)
class FileRule:
    key: RuleKey
    dest_kind: DestKind
    action: Action


RuleFile = dict[str, list[FileRule]]  # container name -> its whole rule set, oldest first


class _Invalid(Exception):
    """What is wrong with a rule file, and where."""


def load_rule_file(path: Path) -> RuleFile:
    """The checked rules of a file, or one UserError naming the file and the problem."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise UserError(f"cannot read rule file {path}: {exc.strerror or exc}", EXIT_USAGE) from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"rule file {path}: not UTF-8 text (byte {exc.start})", EXIT_USAGE) from exc
    try:
        return parse_rule_file(text, toml=path.suffix == ".toml")
    except _Invalid as exc:
        raise UserError(f"rule file {path}: {exc}; nothing was changed", EXIT_USAGE) from exc


def parse_rule_file(text: str, toml: bool = False) -> RuleFile:
    try:
        document = tomllib.loads(text) if toml else json.loads(text)
    except json.JSONDecodeError as exc:
        raise _Invalid(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise _Invalid(f"not valid TOML ({exc})") from exc
    if not isinstance(document, dict):
        raise _Invalid("not an object with 'version' and 'containers'")
    version = document.get("version")
    if version != RULE_FILE_VERSION:
        newer = type(version) is int and version > RULE_FILE_VERSION
        raise _Invalid(
            f"format version {version!r}"
            + (" is newer than this egress-top understands" if newer else f", expected {RULE_FILE_VERSION}")
        )
    if set(document) != {"version", "containers"}:
        raise _Invalid(f"top-level fields {sorted(document)}, expected ['containers', 'version']")
    containers = document["containers"]
    if not isinstance(containers, dict):
        raise _Invalid("'containers' is not an object of container name -> list of rules")
    parsed: RuleFile = {}
    for name, raw_rules in containers.items():
        rules = _parse_container(name, raw_rules)
        container = rules[0].key.container if rules else _container_name(name)
        if container in parsed:
            raise _Invalid(f"container {container} is named twice")
        parsed[container] = rules
    return parsed


def _container_name(name: str) -> str:
    try:
        return checked_rule(name, "0.0.0.0/0", "block", None, "any")[0].container
    except UserError as exc:
        raise _Invalid(str(exc)) from exc


def _parse_container(name: str, raw_rules: object) -> list[FileRule]:
    if not isinstance(raw_rules, list):
        raise _Invalid(f"containers.{name} is not a list of rules")
    rules: list[FileRule] = []
    for index, raw in enumerate(raw_rules):
        where = f"containers.{name}[{index}]"
        rule = _parse_rule(where, name, raw)
        if any(earlier.key == rule.key for earlier in rules):
            raise _Invalid(f"{where}: a second rule for {rule.key.dest} with the same port and proto")
        rules.append(rule)
    return rules


def _parse_rule(where: str, container: str, raw: object) -> FileRule:
    if not isinstance(raw, dict):
        raise _Invalid(f"{where} is not an object")
    if not _REQUIRED_FIELDS <= set(raw) <= _RULE_FIELDS:
        raise _Invalid(f"{where} has fields {sorted(raw)}: needs action and dest, may have port and proto")
    port, proto = raw.get("port"), raw.get("proto", "any")
    # Exact types: JSON true is not a port, and 443.0 is not one either.
    if port is not None and type(port) is not int:
        raise _Invalid(f"{where}.port is {port!r}, not a whole number")
    for field_name, value in (("action", raw["action"]), ("dest", raw["dest"]), ("proto", proto)):
        if type(value) is not str:
            raise _Invalid(f"{where}.{field_name} is {value!r}, not a string")
    try:
        key, dest_kind, action = checked_rule(container, raw["dest"], raw["action"], port, proto)
    except UserError as exc:
        raise _Invalid(f"{where}: {exc}") from exc
    return FileRule(key, dest_kind, action)


def resolve_names(rule_file: RuleFile, resolver: Resolver) -> dict[str, tuple[str, ...]]:
    """Addresses of every host name the file names: resolved before the store is locked,
    and a name that does not resolve fails the whole apply."""
    names = {rule.key.dest for rules in rule_file.values() for rule in rules if rule.dest_kind == "name"}
    return {name: resolve(name, resolver) for name in sorted(names)}


def apply_to(
    contents: StoreContents,
    rule_file: RuleFile,
    addresses_of: Mapping[str, tuple[str, ...]],
    running: Collection[str],
    now: str,
) -> list[str]:
    """Make each named container's rules in contents exactly the file's; returns the
    diff ('-'/'+' lines), empty when nothing changed. now: RFC 3339 for new rules."""
    diff: list[str] = []
    for container, wanted in rule_file.items():
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
    want: FileRule,
    existing: Rule | None,
    addresses_of: Mapping[str, tuple[str, ...]],
    running: Collection[str],
    now: str,
) -> Rule:
    if existing is not None and existing.action == want.action:
        return existing
    if existing is not None:
        return replace(existing, action=want.action, added_at=now)
    name_rule = want.dest_kind == "name"
    return Rule(
        rule_id=contents.allocate_rule_id(),
        container=want.key.container,
        dest=want.key.dest,
        dest_kind=want.dest_kind,
        port=want.key.port,
        proto=want.key.proto,
        action=want.action,
        added_at=now,
        addresses=addresses_of[want.key.dest] if name_rule else (want.key.dest,),
        resolved_at=now if name_rule else None,
        pending=want.key.container not in running,
    )


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
    rule_file: RuleFile,
    running: Collection[str],
    dry_run: bool = False,
    resolver: Resolver = socket.getaddrinfo,
    now: datetime | None = None,
) -> list[str]:
    """Apply in one store transaction (all or nothing); with dry_run, to a copy only."""
    addresses_of = resolve_names(rule_file, resolver)
    stamp = (now or datetime.now(UTC)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if dry_run:
        return apply_to(store.load(), rule_file, addresses_of, running, stamp)
    with store.transaction() as contents:
        return apply_to(contents, rule_file, addresses_of, running, stamp)
