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
optionally ``port`` and ``proto`` (default any): the meaning of agent/policy/semantics.py.
Each named container's list becomes its whole rule set, in that order
(agent/policy/apply.py). Unknown fields are refused, not ignored: a later version
(learned allow-lists) adds fields under a new version number.
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import EXIT_USAGE, UserError
from agent.policy.document import RULE_FIELDS, DocumentError, decode_text, load_document, parse_rule_fields
from agent.policy.rules import DesiredRules, RuleSpec, check_container

RULE_FILE_VERSION = 1
_REQUIRED_FIELDS = {"action", "dest"}

RuleFile = DesiredRules  # what a rule file states for the containers it names


def load_rule_file(path: Path) -> RuleFile:
    """The checked rules of a file, or one UserError naming the file and the problem."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read rule file {path}: {exc.strerror or exc}", EXIT_USAGE) from exc
    try:
        return parse_rule_file(decode_text(raw), toml=path.suffix == ".toml")
    except DocumentError as exc:
        raise UserError(f"rule file {path}: {exc}; nothing was changed", EXIT_USAGE) from exc


def parse_rule_file(text: str, toml: bool = False) -> RuleFile:
    """The checked rules of a rule file's text; DocumentError says what is wrong, and where."""
    document = load_document(text, version=RULE_FILE_VERSION, fields=("version", "containers"), toml=toml)
    containers = document["containers"]
    if not isinstance(containers, dict):
        raise DocumentError("'containers' is not an object of container name -> list of rules")
    parsed: RuleFile = {}
    for name, raw_rules in containers.items():
        container = _container_name(name)
        if container in parsed:
            raise DocumentError(f"container {container} is named twice")
        parsed[container] = _parse_container(name, raw_rules)
    return parsed


def _container_name(name: str) -> str:
    try:
        return check_container(name)
    except UserError as exc:
        raise DocumentError(str(exc)) from exc


def _parse_container(name: str, raw_rules: object) -> list[RuleSpec]:
    if not isinstance(raw_rules, list):
        raise DocumentError(f"containers.{name} is not a list of rules")
    rules: list[RuleSpec] = []
    for index, raw in enumerate(raw_rules):
        where = f"containers.{name}[{index}]"
        if not isinstance(raw, dict):
            raise DocumentError(f"{where} is not an object")
        if not _REQUIRED_FIELDS <= set(raw) <= RULE_FIELDS:
            raise DocumentError(
                f"{where} has fields {sorted(raw)}: needs action and dest, may have port and proto"
            )
        rule = parse_rule_fields(where, name, raw)
        if any(earlier.key == rule.key for earlier in rules):
            raise DocumentError(f"{where}: a second rule for {rule.key.dest} with the same port and proto")
        rules.append(rule)
    return rules
