"""Command-line front ends. Thin: parse, check, call the layers, print.

Every check that can fail (root, Docker, bpffs, headers, unknown container) runs
before anything is attached, and a UserError becomes one line on stderr and a
non-zero exit.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from agent.datapath import DEFAULT_FLOW_TABLE_SIZE, check_privileges, cleanup_everything, open_datapath
from agent.errors import EXIT_USAGE, UserError
from agent.export import write_ndjson
from agent.inventory import DockerInventory, connect_docker, require_containers
from agent.model import Inventory, Snapshot
from agent.monitor import Monitor

SORT_KEYS = ("rate", "bytes", "packets", "flows", "drops", "name")


def _setup_logging(prog: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format=f"{prog}: %(message)s",
        stream=sys.stderr,
    )
    # --verbose is about our datapath and inventory, not every HTTP request to dockerd
    for chatty in ("urllib3", "docker"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


def reports_errors(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn UserError into one stderr line and its exit code (detail only with --verbose)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            verbose = kwargs.get("verbose", False)
            _setup_logging(prog, verbose)
            try:
                return command(*args, **kwargs)
            except UserError as exc:
                click.echo(f"{prog}: {exc}", err=True)
                if verbose and exc.detail:
                    click.echo(exc.detail, err=True)
                sys.exit(exc.exit_code)

        return wrapper

    return decorate


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so every finally-block (detach, restore terminal) runs."""

    def handler(_signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _container_filter(inventory: Inventory, refs: tuple[str, ...]) -> set[str] | None:
    return {c.id for c in require_containers(inventory, refs)} if refs else None


def _intervals(interval: float, count: int | None) -> Iterator[int]:
    """Yield once per interval on a fixed schedule (no drift from the work done)."""
    deadline = time.monotonic()
    number = 0
    while count is None or number < count:
        deadline += interval
        time.sleep(max(0.0, deadline - time.monotonic()))
        number += 1
        yield number


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--json", "as_json", is_flag=True, help="Write NDJSON flow records to stdout (schema v1).")
@click.option("-i", "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True,
              help="Seconds between refreshes.")
@click.option("-n", "--count", type=click.IntRange(min=1), default=None,
              help="Exit after N refreshes (default: run until q, Ctrl-C or SIGTERM).")
@click.option("-c", "--container", "containers", multiple=True, metavar="NAME",
              help="Only this container (name, compose service or id prefix); repeatable.")
@click.option("--sort", type=click.Choice(SORT_KEYS), default="rate", show_default=True, help="Sort containers by.")
@click.option("--flows", "flows_per_container", type=click.IntRange(min=0), default=5, show_default=True,
              help="Flows shown under each container.")
@click.option("--no-color", is_flag=True, help="No colour (NO_COLOR is honoured too).")
@click.option("--flow-table-size", type=click.IntRange(min=1024), default=DEFAULT_FLOW_TABLE_SIZE,
              show_default=True, help="Flows the datapath tracks; the oldest are evicted beyond it.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logs, and the verifier log when a load fails.")
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
    # Unknown --container names fail here, before anything is attached.
    only = _container_filter(DockerInventory(client).snapshot(), containers)
    interactive = not as_json and sys.stdout.isatty()
    with _sigterm_exits(), open_datapath(flow_table_size) as datapath:
        monitor = Monitor(datapath, client)
        monitor.start()
        try:
            if interactive:
                _run_tui(monitor, interval, count, sort, flows_per_container, containers, no_color)
            else:
                _run_stream(monitor, interval, count, as_json, only, sort, flows_per_container)
        except KeyboardInterrupt:
            pass
        finally:
            monitor.stop()


def _run_stream(
    monitor: Monitor,
    interval: float,
    count: int | None,
    as_json: bool,
    only: set[str] | None,
    sort: str,
    flows_per_container: int,
) -> None:
    for _ in _intervals(interval, count):
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
    from dataclasses import replace

    return replace(snapshot, stats=tuple(s for s in snapshot.stats if s.container.id in container_ids))


def _run_tui(
    monitor: Monitor,
    interval: float,
    count: int | None,
    sort: str,
    flows_per_container: int,
    containers: tuple[str, ...],
    no_color: bool,
) -> None:
    from agent.tui import ViewState, run_live

    state = ViewState(sort=sort, flows_per_container=flows_per_container, name_filter=" ".join(containers))
    color = not no_color and "NO_COLOR" not in os.environ
    run_live(monitor.poll, interval, count, state, color)


def _not_implemented(prog: str) -> Callable[..., None]:
    @click.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def command() -> None:
        click.echo(f"{prog}: not implemented yet (see README: enforcement lands with egress-block)", err=True)
        sys.exit(EXIT_USAGE)

    return command


egress_block = _not_implemented("egress-block")
egress_allow = _not_implemented("egress-allow")
egress_unblock = _not_implemented("egress-unblock")
egress_rules = _not_implemented("egress-rules")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def egress_agent() -> None:
    """The long-running agent, and housekeeping."""


@egress_agent.command()
@click.option("-v", "--verbose", is_flag=True)
@reports_errors("egress-agent")
def cleanup(verbose: bool) -> None:
    """Remove every tc filter, pin and map of egress-top, rules' enforcement included."""
    check_privileges()
    for item in cleanup_everything() or ["nothing of ours was attached or pinned"]:
        click.echo(f"removed {item}" if not item.startswith("nothing") else item)
