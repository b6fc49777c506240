"""One parser for the rule documents egress-top reads: the store's rules.json and rule files.

Both are a versioned object with an exact set of top-level fields, and both state a
rule with the same fields, checked the same way. Unknown fields are refused, not
ignored: a later version adds fields under a new version number, so an older
egress-top never half-understands a newer document.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Collection, Mapping
from typing import Any

from agent.errors import UserError
from agent.policy.rules import RuleSpec, rule_spec

# What a rule states, as parse_rule_fields reads it; a document may add fields of its own.
RULE_FIELDS = frozenset({"action", "dest", "port", "proto"})


class DocumentError(Exception):
    """What is wrong with a document, and where in it; the caller names the file."""


def decode_text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DocumentError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def load_document(text: str, *, version: int, fields: Collection[str], toml: bool = False) -> dict[str, Any]:
    """The top-level object of a JSON (or TOML) document of this format version with
    exactly these fields; what the fields hold is the caller's to check."""
    try:
        document = tomllib.loads(text) if toml else json.loads(text)
    except json.JSONDecodeError as exc:
        raise DocumentError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise DocumentError(f"not valid TOML ({exc})") from exc
    expected = sorted(fields)
    if not isinstance(document, dict):
        raise DocumentError(f"not a JSON object (expected one with the fields {expected})")
    found = document.get("version")
    if found != version:
        if type(found) is int and found > version:
            raise DocumentError(
                f"format version {found} is newer than this egress-top understands (version {version})"
            )
        raise DocumentError(f"format version {found!r}, expected {version}")
    if set(document) != set(fields):
        raise DocumentError(f"top-level fields {sorted(document)}, expected {expected}")
    return document


def parse_rule_fields(where: str, container: str, raw: Mapping[str, object]) -> RuleSpec:
    """The rule stated by an object's action, dest, port and proto (absent: no port,
    any protocol). where: how errors name the object, e.g. "containers.web[0]"."""
    port = _port_field(where, raw.get("port"))
    action = _text_field(where, "action", raw.get("action"))
    dest = _text_field(where, "dest", raw.get("dest"))
    proto = _text_field(where, "proto", raw.get("proto", "any"))
    try:
        return rule_spec(container, dest, action, port, proto)
    except UserError as exc:
        raise DocumentError(f"{where}: {exc}") from exc


def _port_field(where: str, value: object) -> int | None:
    # Exact types: JSON true is not a port (a bool is an int to Python), and 443.0 is not one either.
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    raise DocumentError(f"{where}: port is {value!r}, not a whole number")


def _text_field(where: str, name: str, value: object) -> str:
    if not isinstance(value, str):
        raise DocumentError(f"{where}: {name} is {value!r}, not a string")
    return value
