"""NDJSON export: flat, stable records, each interval's flows, containers, then the interval.

Per interval: one "flow" record per flow that moved, one "container" record per
container that sent (its exact totals, whatever the flow table evicted), and one
"interval" record last (what the interval's flows may miss: table fill, evictions,
lost events). Shapes are published in schema/*-record.v1.json and every record the
tests see is validated against them. A field is never renamed or retyped within a
schema version; new optional fields and record types may be added.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, TextIO

from agent.model import ContainerStats, Flow, Snapshot

SCHEMA_VERSION = 1
SCHEMA_RESOURCES = {
    "flow": "flow-record.v1.json",
    "container": "container-record.v1.json",
    "interval": "interval-record.v1.json",
}
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
        **_record_head("flow", snapshot),
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


def _record_head(record_type: str, snapshot: Snapshot) -> dict[str, Any]:
    return {
        "type": record_type,
        "schema_version": SCHEMA_VERSION,
        "time": rfc3339(snapshot.time),
        "interval_seconds": round(snapshot.interval, 6),
    }


def container_record(stats: ContainerStats, snapshot: Snapshot) -> dict[str, Any]:
    container = stats.container
    return {
        **_record_head("container", snapshot),
        "container_id": container.id,
        "container_name": container.name,
        "container_image": container.image,
        "compose_project": container.compose_project,
        "compose_service": container.compose_service,
        "bytes": stats.bytes_total,
        "packets": stats.packets_total,
        "bytes_delta": stats.bytes_delta,
        "packets_delta": stats.packets_delta,
        "dropped_packets": stats.dropped_packets_total,
        "dropped_packets_delta": stats.dropped_packets_delta,
        "active_flows": stats.active_flows,
        "overflow_packets_delta": stats.overflow_packets_delta,
    }


def interval_record(snapshot: Snapshot) -> dict[str, Any]:
    table, losses = snapshot.table, snapshot.losses
    return {
        **_record_head("interval", snapshot),
        "flow_table_used": table.used,
        "flow_table_size": table.size,
        "flows_evicted": losses.evicted,
        "flows_evicted_total": table.evicted,
        "flows_restarted": losses.restarted_flows,
        "moved_events_lost": losses.moved_lost,
        "full_reads": int(losses.full_read),
        "overflow_packets": sum(snapshot.overflow_packets.values()),
        "containers_overflowing": len(snapshot.overflow_packets),
    }


def write_ndjson(snapshot: Snapshot, out: TextIO, container_ids: set[str] | None = None) -> int:
    """Write this interval's records (the flows and containers that moved, then the
    interval's own); returns how many flow records."""
    flows = [
        flow
        for flow in snapshot.flows
        if container_ids is None or (flow.container is not None and flow.container.id in container_ids)
    ]
    containers = [
        stats
        for stats in snapshot.stats
        if (stats.packets_delta or stats.overflow_packets_delta)
        and (container_ids is None or stats.container.id in container_ids)
    ]
    records = [
        *(flow_record(flow, snapshot) for flow in flows),
        *(container_record(stats, snapshot) for stats in containers),
        interval_record(snapshot),
    ]
    out.write("".join(json.dumps(record, separators=(",", ":")) + "\n" for record in records))
    out.flush()
    return len(flows)
