"""egress-agent: the long-running agent (run), its health (status), and housekeeping (cleanup)."""

from __future__ import annotations

import contextlib
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

import click

from agent.agent_status import StatusPublisher, agent_presence, read_live, withdraw
from agent.cli.common import HELP_OPTIONS, reports_errors, verbose_option
from agent.cli.monitoring import flow_table_option, interval_option, intervals, monitoring
from agent.cli.ruleset import apply_to_store, describe_changes
from agent.datapath import check_privileges, cleanup_everything
from agent.enforcement import NAME_REFRESH_SECONDS
from agent.errors import EXIT_USAGE, UserError
from agent.export import write_ndjson
from agent.export_file import ExportFile
from agent.inventory import DockerInventory, connect_docker
from agent.metrics import (
    DEFAULT_LISTEN,
    REMOVED_SERIES_GRACE_SECONDS,
    AgentHealth,
    SnapshotMetrics,
    parse_listen,
    serving,
)
from agent.policy import RuleStore, load_rule_file
from agent.rules_view import format_status


@click.group(context_settings=HELP_OPTIONS)
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
    help="Append NDJSON flow records to this file ('-' for stdout); SIGHUP reopens it (logrotate).",
)
@click.option(
    "--export-max-mb",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Rotate the --export file when it reaches this size (FILE.1, FILE.2, ...).",
)
@click.option(
    "--export-keep",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="Rotated files kept with --export-max-mb.",
)
@click.option(
    "--apply-rules",
    "rules_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    metavar="FILE",
    help="Apply this rule file (as 'egress-rules apply') before attaching, e.g. a Swarm config.",
)
@flow_table_option
@click.option(
    "--resolve-every",
    type=click.FloatRange(min=0.5),
    default=NAME_REFRESH_SECONDS,
    show_default=True,
    help="Seconds between re-resolutions of host-name rules.",
)
@click.option(
    "--metrics",
    "metrics_listen",
    default=DEFAULT_LISTEN,
    show_default=True,
    metavar="ADDR:PORT|off",
    help="Serve Prometheus metrics at http://ADDR:PORT/metrics; 'off' disables.",
)
@click.option(
    "--metrics-grace",
    type=click.FloatRange(min=0),
    default=REMOVED_SERIES_GRACE_SECONDS,
    show_default=True,
    help="Seconds a removed container's series stay in /metrics.",
)
@verbose_option
@reports_errors("egress-agent")
def run(
    interval: float,
    export_path: str | None,
    export_max_mb: float | None,
    export_keep: int,
    rules_path: Path | None,
    flow_table_size: int,
    resolve_every: float,
    metrics_listen: str,
    metrics_grace: float,
    verbose: bool,
) -> None:
    """Attach to every container as it starts, enforce rules, re-resolve names, export flows."""
    listen = parse_listen(metrics_listen)
    if export_max_mb is not None and export_path in (None, "-"):
        raise UserError("--export-max-mb rotates a file: give --export FILE", EXIT_USAGE)
    wanted = load_rule_file(rules_path) if rules_path else None  # a bad file: refused before anything
    check_privileges()
    presence = contextlib.ExitStack()
    presence.enter_context(agent_presence())  # a second agent is refused before it changes anything
    client = connect_docker()
    if wanted is not None:
        # the store only: the datapath takes it when the monitor starts, below
        diff = apply_to_store(RuleStore(), wanted, DockerInventory(client).snapshot())
        click.echo(f"egress-agent: applied {rules_path}: {describe_changes(diff)}", err=True)
    metrics = SnapshotMetrics(metrics_grace)
    with (
        presence,
        # first: an unwritable file fails before attaching, and SIGHUP reopens from here on
        _export_sink(export_path, export_max_mb, export_keep) as sink,
        serving(listen, metrics) as stop_serving,  # a taken port fails here, before attaching
        monitoring(client, flow_table_size, resolve_every, build_flows=export_path is not None) as monitor,
    ):
        observed = [c for c in monitor.inventory.containers if c.endpoints]
        publish = StatusPublisher()  # rewrites an unchanged status every few seconds, not each interval
        publish(monitor.status())  # before "ready": a front end run right after it sees the agent
        click.echo(
            f"egress-agent: ready: {len(observed)} containers observed, watching for new ones", err=True
        )
        try:
            for _ in intervals(interval, None):
                snapshot = monitor.poll()
                status = monitor.status()
                publish(status)
                if listen is not None:
                    health = AgentHealth(
                        status,
                        monitor.attach_latency.read(),
                        monitor.rule_hits,
                        monitor.datapath.read_ifindex_counters,
                    )
                    metrics.update(snapshot, health)
                if sink is not None:
                    write_ndjson(snapshot, sink())
        finally:
            stop_serving()  # before the datapath closes
            withdraw()


@egress_agent.command()
@reports_errors("egress-agent")
def status() -> None:
    """The running agent's health: exit 0 when every container with rules is enforced, 1 if not."""
    check_privileges()
    current = read_live()
    if current is None:
        click.echo("egress-agent: not running: rules are not attached to containers that (re)start")
        sys.exit(1)
    for line in format_status(current):
        click.echo(line)
    sys.exit(0 if current.healthy else 1)


@contextlib.contextmanager
def _export_sink(path: str | None, max_mb: float | None, keep: int) -> Iterator[Callable[[], TextIO] | None]:
    """Where each interval's records go. SIGHUP is the daemon convention here, not a stop:
    the file is reopened by its path before the next interval (after logrotate renamed it)."""
    export = None
    if path not in (None, "-"):
        try:
            export = ExportFile(Path(path), None if max_mb is None else int(max_mb * 1024 * 1024), keep)
        except OSError as exc:
            raise UserError(f"cannot open --export {path}: {exc.strerror or exc}", EXIT_USAGE) from exc
    previous = signal.signal(
        signal.SIGHUP,
        signal.SIG_IGN if export is None else lambda _signum, _frame: export.request_reopen(),
    )
    try:
        if export is not None:
            yield export.writer
        else:
            yield None if path is None else (lambda: sys.stdout)
    finally:
        signal.signal(signal.SIGHUP, previous)
        if export is not None:
            export.close()
