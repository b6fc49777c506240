"""NDJSON flow export: one flat, stable record per flow per interval.

The record's shape is published in schema/flow-record.v1.json and every record the
tests see is validated against it. A field is never renamed or retyped within a
schema version; new optional fields may be added.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, TextIO

from agent.model import Flow, Snapshot

SCHEMA_VERSION = 1
SCHEMA_RESOURCE = "flow-record.v1.json"
ICMP_PROTOCOLS = (1, 58)
PORT_PROTOCOLS = (6, 17, 132)


def rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def flow_record(flow: Flow, snapshot: Snapshot) -> dict[str, Any]:
    key, counters, container = flow.key, flow.counters, flow.container
    endpoint = (
        next((ep for ep in container.endpoints if ep.ifindex == key.ifindex), None) if container else None
    )
    has_ports = key.proto in PORT_PROTOCOLS
    is_icmp = key.proto in ICMP_PROTOCOLS
    return {
        "schema_version": SCHEMA_VERSION,
        "time": rfc3339(snapshot.time),
        "interval_seconds": round(snapshot.interval, 6),
        "container_id": container.id if container else None,
        "container_name": container.name if container else None,
        "container_image": container.image if container else None,
        "compose_project": container.compose_project if container else None,
        "compose_service": container.compose_service if container else None,
        "network": endpoint.network if endpoint else None,
        "veth": endpoint.veth if endpoint else None,
        "ifindex": key.ifindex,
        "family": f"ipv{key.family}",
        "src": key.src,
        "src_port": key.src_port if has_ports else None,
        "dst": key.dst,
        "dst_port": key.dst_port if has_ports else None,
        "proto": flow.proto_name if not flow.proto_name.isdigit() else key.proto,
        "proto_number": key.proto,
        "icmp_type": key.src_port if is_icmp else None,
        "icmp_code": key.dst_port if is_icmp else None,
        "bytes": counters.bytes,
        "packets": counters.packets,
        "bytes_delta": flow.bytes_delta,
        "packets_delta": flow.packets_delta,
        "dropped_bytes": counters.dropped_bytes,
        "dropped_packets": counters.dropped_packets,
        "verdict": str(counters.verdict),
        "rule_id": counters.rule_id or None,
        "first_seen": rfc3339(flow.first_seen),
        "last_seen": rfc3339(flow.last_seen),
        "dst_kind": str(flow.dst_kind),
        "dst_name": flow.dst_name,
    }


def write_ndjson(snapshot: Snapshot, out: TextIO, container_ids: set[str] | None = None) -> int:
    """Write the flows that moved in this interval; returns how many records."""
    written = 0
    for flow in snapshot.flows:
        if container_ids is not None and (flow.container is None or flow.container.id not in container_ids):
            continue
        out.write(json.dumps(flow_record(flow, snapshot), separators=(",", ":")) + "\n")
        written += 1
    out.flush()
    return written
