"""egress-rules output: one flat row per rule, as JSON or as a plain table."""

from __future__ import annotations

import time
from typing import Any

from agent.datapath import RuleHits
from agent.export import rfc3339
from agent.policy import Rule

COLUMNS = (
    ("id", "ID"),
    ("container", "CONTAINER"),
    ("action", "ACTION"),
    ("dest", "DEST"),
    ("port", "PORT"),
    ("proto", "PROTO"),
    ("hit_packets", "PKTS"),
    ("hit_bytes", "BYTES"),
    ("last_hit", "LAST HIT"),
    ("added_at", "ADDED"),
    ("addresses", "ADDRESSES"),
)


def _wall_clock(monotonic_ns: int) -> str | None:
    if not monotonic_ns:
        return None
    offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
    return rfc3339(offset + monotonic_ns / 1e9)


def rule_row(rule: Rule, hits: RuleHits | None) -> dict[str, Any]:
    """Hits count packets the rule decided: dropped for block, let through for allow."""
    return {
        "id": rule.rule_id,
        "container": rule.container,
        "action": rule.action,
        "dest": rule.dest,
        "dest_kind": rule.dest_kind,
        "port": rule.port,
        "proto": rule.proto,
        "addresses": list(rule.addresses),
        "resolved_at": rule.resolved_at,
        "added_at": rule.added_at,
        "pending": rule.pending,
        "hit_packets": hits.packets if hits else 0,
        "hit_bytes": hits.bytes if hits else 0,
        "last_hit": _wall_clock(hits.last_hit_ns) if hits else None,
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ",".join(value)
    return str(value)


def format_rules_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return "no rules"
    table = [[title for _, title in COLUMNS]] + [[_cell(row[key]) for key, _ in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in table
    ]
    pending = [row for row in rows if row["pending"]]
    if pending:
        lines.append(f"{len(pending)} pending: their container does not exist yet")
    return "\n".join(lines)
