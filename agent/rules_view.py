"""egress-rules output: one flat row per rule, as JSON or as a plain table."""

from __future__ import annotations

import time
from typing import Any

from agent.agent_status import STALE_AFTER_SECONDS, AgentStatus
from agent.datapath import RuleHits
from agent.enforcement_state import ContainerEnforcement
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
    ("state", "STATE"),
)


def _wall_clock(monotonic_ns: int) -> str | None:
    if not monotonic_ns:
        return None
    offset = time.time() - time.clock_gettime(time.CLOCK_MONOTONIC)
    return rfc3339(offset + monotonic_ns / 1e9)


def rule_row(rule: Rule, hits: RuleHits | None, enforcement: ContainerEnforcement | None) -> dict[str, Any]:
    """Hits count packets the rule decided: dropped for block, let through for allow.
    state is the live state of the rule's container (None: not readable without root)."""
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
        "state": enforcement.text if enforcement else None,
        "enforced_veths": enforcement.enforced_veths if enforcement else None,
        "unparsed_dropped_packets": enforcement.unparsed_dropped_packets if enforcement else None,
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
    unparsed = {
        row["container"]: row["unparsed_dropped_packets"] for row in rows if row["unparsed_dropped_packets"]
    }
    lines += [
        f"{name}: {count} packets dropped unparsed (transport header out of reach: README, enforcement)"
        for name, count in sorted(unparsed.items())
    ]
    loose = sorted({row["container"] for row in rows if (row["state"] or "").startswith("container running")})
    if loose:
        lines.append(f"WARNING: NOT enforced now: {', '.join(loose)} (see STATE)")
    return "\n".join(lines)


def format_status(status: AgentStatus) -> list[str]:
    """egress-agent status, one fact a line."""
    uptime = time.time() - status.started_at
    health = "healthy" if status.healthy else "NOT healthy"
    lines = [
        f"egress-agent: pid {status.pid}, up {uptime:.0f} s, {health}",
        f"attached veths: {status.attached_veths}",
        f"rules enforced: {status.rules_enforced} of {status.rules}"
        + (f" ({', '.join(status.containers_enforced)})" if status.containers_enforced else ""),
        f"not enforced: {len(status.not_enforced)}",
        *(f"  {name}: {why}" for name, why in sorted(status.not_enforced.items())),
        f"refresh retries: {status.refresh_retries}, failures: {status.refresh_failures}"
        + (f" (last: {status.last_failure})" if status.last_failure else ""),
    ]
    if time.time() - status.updated_at >= STALE_AFTER_SECONDS:
        lines.append(f"status last written {time.time() - status.updated_at:.0f} s ago: the agent is stuck")
    return lines
