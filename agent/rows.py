"""The cells of egress-top's rows, shared by the plain output and the live screen,
and the sort orders. Pure functions of a Snapshot."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.model import ContainerStats, Flow, Snapshot
from agent.units import format_age, format_bits_per_second, format_bytes, format_rate

SORT_KEYS: dict[str, Callable[[ContainerStats], object]] = {
    "rate": lambda s: s.bytes_delta,
    "bytes": lambda s: s.bytes_total,
    "packets": lambda s: s.packets_delta,
    "flows": lambda s: s.active_flows,
    "drops": lambda s: s.dropped_packets_total,
    "name": lambda s: s.container.name,
}
CONTAINER_COLUMNS = ("CONTAINER", "IMAGE", "ADDRESSES", "RATE", "BYTES", "PKT/S", "FLOWS", "DROPS")
FLOW_COLUMNS = ("DESTINATION", "NAME", "KIND", "PROTO", "RATE", "BYTES", "AGE", "VERDICT")


def sorted_stats(snapshot: Snapshot, sort: str, reverse: bool = False) -> list[ContainerStats]:
    """Busiest first for numbers, A to Z for names; reverse flips either."""
    descending = sort != "name"
    return sorted(snapshot.stats, key=SORT_KEYS[sort], reverse=descending != reverse)  # type: ignore[arg-type]


def per_second(count: int, interval: float) -> float:
    return count / interval if interval > 0 else 0.0


def container_cells(stats: ContainerStats, interval: float) -> tuple[str, ...]:
    container = stats.container
    name = container.display_name
    if container.netns_sharers:
        name += f" +{len(container.netns_sharers)} sharing"
    return (
        name,
        container.image,
        ",".join(container.addresses) or "-",
        format_bits_per_second(per_second(stats.bytes_delta, interval)),
        format_bytes(stats.bytes_total),
        format_rate(per_second(stats.packets_delta, interval)),
        str(stats.active_flows),
        str(stats.dropped_packets_total),
    )


def destination(flow: Flow) -> str:
    address = f"[{flow.key.dst}]" if flow.key.family == 6 else flow.key.dst
    if flow.key.proto in (6, 17, 132):
        return f"{address}:{flow.key.dst_port}"
    return address


def flow_cells(flow: Flow, interval: float, now: float | None = None) -> tuple[str, ...]:
    return (
        destination(flow),
        flow.dst_name or "-",
        str(flow.dst_kind),
        flow.proto_name,
        format_bits_per_second(per_second(flow.bytes_delta, interval)),
        format_bytes(flow.counters.bytes),
        format_age((now or time.time()) - flow.first_seen),
        str(flow.counters.verdict),
    )
