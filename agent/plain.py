"""egress-top's output when stdout is not a terminal: a plain table per interval, like
`top -b`. No colour, no box drawing, fixed columns, long names cut with an ellipsis."""

from __future__ import annotations

import socket
from datetime import UTC, datetime

from agent.model import Snapshot
from agent.rows import CONTAINER_COLUMNS, container_cells, flow_cells, sorted_stats
from agent.units import format_bits_per_second

CONTAINER_WIDTHS = (24, 20, 18, 11, 10, 7, 5, 6)
FLOW_WIDTHS = (28, 18, 9, 6, 11, 10, 6, 9)
FLOW_INDENT = "  -> "


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def line(cells: tuple[str, ...], widths: tuple[int, ...]) -> str:
    return " ".join(fit(cell, width).ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()


def header(snapshot: Snapshot, hostname: str | None = None) -> str:
    when = datetime.fromtimestamp(snapshot.time, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    table = snapshot.table
    evicted = f" ({table.evicted} evicted)" if table.evicted else ""
    rate = format_bits_per_second(snapshot.total_bytes_delta / snapshot.interval if snapshot.interval else 0)
    return (
        f"egress-top {hostname or socket.gethostname()} {when} interval {snapshot.interval:.1f}s"
        f" containers {len(snapshot.stats)} observed, {len(snapshot.unobservable)} not"
        f" egress {rate} flows {table.used}/{table.size}{evicted}{losses(snapshot)}"
    )


def losses(snapshot: Snapshot) -> str:
    """What this interval's flows miss, said only when something is (totals stay exact)."""
    lost, overflow = snapshot.losses, snapshot.overflow_packets
    parts = [
        f"{lost.evicted} evicted" if lost.evicted else "",
        f"{lost.restarted_flows} restarted" if lost.restarted_flows else "",
        f"{lost.moved_lost} events lost" if lost.moved_lost else "",
        f"overflow {', '.join(f'{name} {packets}p' for name, packets in sorted(overflow.items()))}"
        if overflow
        else "",
    ]
    said = "; ".join(part for part in parts if part)
    return f" LOSS this interval: {said}" if said else ""


def enforcement_warning(snapshot: Snapshot) -> str | None:
    """Said on every screen while a running container's rules are not in force."""
    if not snapshot.not_enforced:
        return None
    return f"WARNING: rules NOT enforced for {', '.join(snapshot.not_enforced)} (see egress-rules)"


def format_plain(snapshot: Snapshot, sort: str = "rate", flows_per_container: int = 5) -> str:
    warning = enforcement_warning(snapshot)
    lines = [header(snapshot), *([warning] if warning else []), line(CONTAINER_COLUMNS, CONTAINER_WIDTHS)]
    for stats in sorted_stats(snapshot, sort):
        lines.append(line(container_cells(stats, snapshot.interval), CONTAINER_WIDTHS))
        for flow in stats.flows[:flows_per_container]:
            cells = flow_cells(flow, snapshot.interval, snapshot.time)
            lines.append(FLOW_INDENT + line(cells, FLOW_WIDTHS))
    if snapshot.unattributed_flows:
        lines.append(f"(unmapped veths) {len(snapshot.unattributed_flows)} flows not yet attributed")
    if snapshot.unobservable:
        lines.append("NOT OBSERVED")
        for container in snapshot.unobservable:
            lines.append(
                f"{fit(container.name, CONTAINER_WIDTHS[0]).ljust(CONTAINER_WIDTHS[0])} "
                f"{container.why_not_observed}"
            )
    return "\n".join(lines)
