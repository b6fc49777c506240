"""egress-top: live per-container egress on the screen, as plain lines, or as NDJSON."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from typing import TYPE_CHECKING

import click

from agent.cli.common import HELP_OPTIONS, reports_errors, verbose_option
from agent.cli.monitoring import flow_table_option, interval_option, intervals, monitoring
from agent.datapath import check_privileges
from agent.export import write_ndjson
from agent.inventory import DockerInventory, connect_docker, require_containers
from agent.model import Inventory, Snapshot

if TYPE_CHECKING:
    from agent.monitor import Monitor  # imported by monitoring(), beside a first start's compile

SORT_KEYS = ("rate", "bytes", "packets", "flows", "drops", "name")


def _container_filter(inventory: Inventory, refs: tuple[str, ...]) -> set[str]:
    return {c.id for c in require_containers(inventory, refs)}


@click.command(context_settings=HELP_OPTIONS)
@click.option("--json", "as_json", is_flag=True, help="Write NDJSON flow records to stdout (schema v1).")
@interval_option("Seconds between refreshes.")
@click.option(
    "-n",
    "--count",
    type=click.IntRange(min=1),
    default=None,
    help="Exit after N refreshes (default: run until q, Ctrl-C or SIGTERM).",
)
@click.option(
    "-c",
    "--container",
    "containers",
    multiple=True,
    metavar="NAME",
    help="Only this container (name, compose service or id prefix); repeatable.",
)
@click.option(
    "--sort", type=click.Choice(SORT_KEYS), default="rate", show_default=True, help="Sort containers by."
)
@click.option(
    "--flows",
    "flows_per_container",
    type=click.IntRange(min=0),
    default=5,
    show_default=True,
    help="Flows shown under each container.",
)
@click.option("--no-color", is_flag=True, help="No colour (NO_COLOR is honoured too).")
@flow_table_option
@verbose_option
@reports_errors("egress-top")
def egress_top(
    as_json: bool,
    interval: float,
    count: int | None,
    containers: tuple[str, ...],
    sort: str,
    flows_per_container: int,
    no_color: bool,
    flow_table_size: int,
    verbose: bool,
) -> None:
    """Live per-container egress: which container talks to whom, and how much."""
    check_privileges()
    client = connect_docker()
    # Unknown --container names fail here, before anything is attached (without any, no
    # inventory yet: the monitor takes its own).
    only = _container_filter(DockerInventory(client).snapshot(), containers) if containers else None
    with monitoring(client, flow_table_size) as monitor:
        if not as_json and sys.stdout.isatty():
            _run_tui(monitor, interval, count, sort, flows_per_container, only, no_color)
        else:
            _run_stream(monitor, interval, count, as_json, only, sort, flows_per_container)


def _run_stream(
    monitor: Monitor,
    interval: float,
    count: int | None,
    as_json: bool,
    only: set[str] | None,
    sort: str,
    flows_per_container: int,
) -> None:
    for _ in intervals(interval, count):
        snapshot = monitor.poll()
        if as_json:
            write_ndjson(snapshot, sys.stdout, only)
        else:
            from agent.plain import format_plain

            sys.stdout.write(format_plain(_only(snapshot, only), sort, flows_per_container) + "\n")
            sys.stdout.flush()


def _only(snapshot: Snapshot, container_ids: set[str] | None) -> Snapshot:
    if container_ids is None:
        return snapshot
    return replace(snapshot, stats=tuple(s for s in snapshot.stats if s.container.id in container_ids))


def _run_tui(
    monitor: Monitor,
    interval: float,
    count: int | None,
    sort: str,
    flows_per_container: int,
    only: set[str] | None,
    no_color: bool,
) -> None:
    from agent.tui import ViewState, run_live

    state = ViewState(sort=sort, flows_per_container=flows_per_container)
    color = not no_color and "NO_COLOR" not in os.environ
    run_live(lambda: _only(monitor.poll(), only), interval, count, state, color)
