"""Command-line front ends. Thin: parse, check, call the layers, print.

Every check that can fail (root, Docker, bpffs, headers, unknown container) runs
before anything is attached, and a UserError becomes one line on stderr and a
non-zero exit.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, TextIO

import click
import docker

from agent.datapath import (
    DEFAULT_FLOW_TABLE_SIZE,
    RuleHits,
    check_privileges,
    cleanup_everything,
    open_datapath,
    open_pinned_maps,
)
from agent.enforcement import (
    NAME_REFRESH_SECONDS,
    check_can_enforce,
    enforce_now,
    flows_of,
    resolve_container_name,
    verdict_changes,
)
from agent.errors import EXIT_USAGE, UserError
from agent.export import write_ndjson
from agent.inventory import DockerInventory, connect_docker, require_containers
from agent.model import PROTO_NAMES, FlowKey, Inventory, Snapshot
from agent.monitor import Monitor
from agent.policy import RuleStore
from agent.rules_view import format_rules_table, rule_row

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


def reports_errors(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn UserError into one stderr line and its exit code (detail only with --verbose)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            verbose = kwargs.get("verbose", False)
            _setup_logging(prog, verbose)
            try:
                with _sigterm_exits():
                    return command(*args, **kwargs)
            except UserError as exc:
                click.echo(f"{prog}: {exc}", err=True)
                if verbose and exc.detail:
                    click.echo(exc.detail, err=True)
                sys.exit(exc.exit_code)
            except KeyboardInterrupt:
                sys.exit(0)  # Ctrl-C or SIGTERM: asked to stop; the finally-blocks cleaned up

        return wrapper

    return decorate


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


def interval_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return click.option(
        "-i", "--interval", type=click.FloatRange(min=0.1), default=1.0, show_default=True, help=help_text
    )


flow_table_option = click.option(
    "--flow-table-size",
    type=click.IntRange(min=1024),
    default=DEFAULT_FLOW_TABLE_SIZE,
    show_default=True,
    help="Flows the datapath tracks; the least recently used are evicted beyond it.",
)
verbose_option = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Debug logs, and the loader's log when the kernel refuses the program.",
)


@contextlib.contextmanager
def _monitoring(
    client: docker.DockerClient, flow_table_size: int, name_refresh_seconds: float = NAME_REFRESH_SECONDS
) -> Iterator[Monitor]:
    """The rule store checked first, then the datapath on every container until the block ends."""
    store = RuleStore()
    store.load()  # a corrupt store is refused before anything is attached
    with open_datapath(flow_table_size) as datapath:
        monitor = Monitor(datapath, client, store, name_refresh_seconds=name_refresh_seconds)
        monitor.start()
        try:
            yield monitor
        except KeyboardInterrupt:
            pass  # q, Ctrl-C or SIGTERM: a normal way to stop
        finally:
            monitor.stop()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
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
    # Unknown --container names fail here, before anything is attached.
    only = _container_filter(DockerInventory(client).snapshot(), containers)
    with _monitoring(client, flow_table_size) as monitor:
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


# --- rules ---------------------------------------------------------------------------

# Port and protocol arrive as text and are checked by the policy layer, so a bad
# value gets the same one-line error as a bad destination (not click's usage text).
_PORT_HELP = "Destination port 1-65535 (tcp/udp; with --proto any: both)."
_PROTO_HELP = "tcp, udp, icmp (ICMPv6 towards IPv6) or any."


def _port(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise UserError(f"port {text!r} is not a number: use 1-65535", EXIT_USAGE) from None


def _rule_change_command(action: str, prog: str) -> click.Command:
    """egress-block and egress-allow: the same command, a different action."""

    @click.command(name=prog, context_settings={"help_option_names": ["-h", "--help"]})
    @click.argument("container")
    @click.argument("dest")
    @click.option("--port", default=None, help=_PORT_HELP)
    @click.option("--proto", default="any", show_default=True, help=_PROTO_HELP)
    @click.option("--pending", is_flag=True, help="Keep the rule for a container that does not exist yet.")
    @click.option(
        "--dry-run", is_flag=True, help="Show which current flows the rule would change; change nothing."
    )
    @click.option("-v", "--verbose", is_flag=True)
    @reports_errors(prog)
    def command(
        container: str, dest: str, port: str | None, proto: str, pending: bool, dry_run: bool, verbose: bool
    ) -> None:
        port_number = _port(port)
        store = RuleStore()
        if dry_run:
            check_privileges()
            inventory = DockerInventory(connect_docker()).snapshot()
            name = resolve_container_name(inventory, container, pending)
            _print_dry_run(store, inventory, name, dest, action, port_number, proto)
            return
        check_can_enforce()
        inventory = DockerInventory(connect_docker()).snapshot()
        name = resolve_container_name(inventory, container, pending)
        rule, replaced = store.add(
            name, dest, action=action, port=port_number, proto=proto, pending=inventory.find(name) is None
        )
        enforce_now(store, inventory, name)
        verb = "replaced" if replaced else "added"
        where = "" if inventory.find(name) else " (pending: applies when the container starts)"
        click.echo(f"{verb} rule {rule.rule_id}: {name} {rule.summary()}{where}")

    command.__doc__ = f"{action.capitalize()} a container's egress to DEST (address, CIDR or host name)."
    return command


def _print_dry_run(
    store: RuleStore, inventory: Inventory, name: str, dest: str, action: str, port: int | None, proto: str
) -> None:
    """Apply the change to a scratch copy of the store and compare each live flow's fate."""
    container = inventory.find(name)
    maps = open_pinned_maps()
    if container is None or maps is None:
        click.echo(
            f"no flows of {name} observed now (egress-top or the agent is not running): nothing to compare"
        )
        return
    try:
        flows = flows_of(maps, container)
    finally:
        maps.close()
    with tempfile.TemporaryDirectory(prefix="egress-top-dry-run-") as scratch:
        if store.path.exists():
            shutil.copy(store.path, Path(scratch) / store.path.name)
        scratch_store = RuleStore(Path(scratch))
        before = scratch_store.rules(name)
        scratch_store.add(name, dest, action=action, port=port, proto=proto)
        after = scratch_store.rules(name)
    changes = verdict_changes(before, after, flows)
    click.echo(
        f"dry run: {len(changes)} of {len(flows)} current flows of {name} would change; nothing was changed"
    )
    for flow, was, becomes in changes:
        click.echo(
            f"  {'cut' if becomes == 'dropped' else 'let through'}: {format_flow(flow)} ({was} -> {becomes})"
        )


def format_flow(flow: FlowKey) -> str:
    proto = PROTO_NAMES.get(flow.proto, str(flow.proto))
    if flow.proto in (6, 17, 132):
        wrap = (lambda a: f"[{a}]") if flow.family == 6 else (lambda a: a)
        return f"{proto} {wrap(flow.src)}:{flow.src_port} -> {wrap(flow.dst)}:{flow.dst_port}"
    return f"{proto} {flow.src} -> {flow.dst}"


egress_block = _rule_change_command("block", "egress-block")
egress_allow = _rule_change_command("allow", "egress-allow")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("container")
@click.argument("dest", required=False)
@click.option("--port", default=None, help=_PORT_HELP)
@click.option("--proto", default="any", show_default=True, help=_PROTO_HELP)
@click.option("--all", "remove_all", is_flag=True, help="Remove every rule of the container.")
@click.option("-v", "--verbose", is_flag=True)
@reports_errors("egress-unblock")
def egress_unblock(
    container: str, dest: str | None, port: str | None, proto: str, remove_all: bool, verbose: bool
) -> None:
    """Remove a rule (block or allow) that matches exactly, or all of a container's with --all."""
    if remove_all == (dest is not None):
        raise UserError("give either DEST (with the rule's --port/--proto) or --all", EXIT_USAGE)
    check_can_enforce()
    inventory = DockerInventory(connect_docker()).snapshot()
    name = resolve_container_name(inventory, container, pending=True)  # rules of a stopped one go too
    store = RuleStore()
    removed = (
        store.remove_all(name)
        if remove_all or dest is None
        else [store.remove(name, dest, _port(port), proto)]
    )
    enforce_now(store, inventory, name)
    for rule in removed:
        click.echo(f"removed rule {rule.rule_id}: {name} {rule.summary()}")
    if not removed:
        click.echo(f"{name} had no rules")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("container", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per rule per line.")
@reports_errors("egress-rules")
def egress_rules(container: str | None, as_json: bool) -> None:
    """Every rule, with its hit counters (packets and bytes it dropped or allowed)."""
    rules = RuleStore().rules(container)
    hits = _rule_hits()
    rows = [rule_row(rule, hits.get(rule.rule_id)) for rule in rules]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(format_rules_table(rows))


def _rule_hits() -> dict[int, RuleHits]:
    """Hit counters from the pinned maps, when we may read them and they exist."""
    try:
        check_privileges()
    except UserError:
        return {}
    maps = open_pinned_maps()
    if maps is None:
        return {}
    try:
        return maps.read_rule_hits()
    finally:
        maps.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def egress_agent() -> None:
    """The long-running agent, and housekeeping."""


@egress_agent.command()
@verbose_option
@reports_errors("egress-agent")
def cleanup(verbose: bool) -> None:
    """Remove every tc filter, pin and map of egress-top, rules' enforcement included."""
    check_privileges()
    removed = cleanup_everything()
    for item in removed:
        click.echo(f"removed {item}")
    if not removed:
        click.echo("nothing of ours was attached or pinned")


@egress_agent.command()
@interval_option("Seconds between flow-table reads.")
@click.option(
    "--export",
    "export_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    default=None,
    help="Append NDJSON flow records to this file ('-' for stdout).",
)
@flow_table_option
@click.option(
    "--resolve-every",
    type=click.FloatRange(min=0.5),
    default=NAME_REFRESH_SECONDS,
    show_default=True,
    help="Seconds between re-resolutions of host-name rules.",
)
@verbose_option
@reports_errors("egress-agent")
def run(
    interval: float, export_path: str | None, flow_table_size: int, resolve_every: float, verbose: bool
) -> None:
    """Attach to every container as it starts, enforce rules, re-resolve names, export flows."""
    check_privileges()
    client = connect_docker()
    with _monitoring(client, flow_table_size, resolve_every) as monitor, _export_sink(export_path) as out:
        observed = [c for c in monitor.inventory.containers if c.endpoints]
        click.echo(
            f"egress-agent: ready: {len(observed)} containers observed, watching for new ones", err=True
        )
        for _ in _intervals(interval, None):
            snapshot = monitor.poll()
            if out is not None:
                write_ndjson(snapshot, out)


@contextlib.contextmanager
def _export_sink(path: str | None) -> Iterator[TextIO | None]:
    if path is None or path == "-":
        yield None if path is None else sys.stdout
        return
    with open(path, "a") as out:
        yield out
