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

from agent.agent_status import publish, read_live, withdraw
from agent.datapath import (
    DEFAULT_FLOW_TABLE_SIZE,
    RuleHits,
    check_privileges,
    cleanup_everything,
    open_datapath,
    open_pinned_maps,
)
from agent.docker_api import EngineClient
from agent.enforcement import (
    NAME_REFRESH_SECONDS,
    check_can_enforce,
    enforce_now,
    flows_of,
    require_enforceable,
    resolve_container_name,
    verdict_changes,
)
from agent.enforcement_state import live_states
from agent.errors import EXIT_USAGE, UserError
from agent.export import write_ndjson
from agent.export_file import ExportFile
from agent.inventory import DockerInventory, connect_docker, require_containers
from agent.lockfile import LockBusy
from agent.metrics import (
    DEFAULT_LISTEN,
    REMOVED_SERIES_GRACE_SECONDS,
    AgentHealth,
    SnapshotMetrics,
    parse_listen,
    serving,
)
from agent.model import PROTO_NAMES, FlowKey, Inventory, Snapshot
from agent.monitor import Monitor
from agent.policy import RuleStore
from agent.rule_file import RuleFile, apply_rule_file, load_rule_file
from agent.rules_view import format_rules_table, format_status, rule_row

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


# Every way of being asked to stop: kill, a terminal that closes (SSH drop, tmux window
# killed), SIGQUIT (Ctrl-backslash), and the reader of a --json pipe going away.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """A stop signal unwinds like Ctrl-C, so every finally-block (detach, restore terminal)
    runs. Only the first one raises: a second (SIGHUP then SIGTERM as a terminal closes)
    must not cut the cleanup short."""
    stopping = False

    def handler(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


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
            except (KeyboardInterrupt, BrokenPipeError):
                # Ctrl-C, a stop signal, or the reader of stdout left (egress-top --json | head):
                # asked to stop; the finally-blocks cleaned up
                _silence_stdout_if_broken()
                sys.exit(0)

        return wrapper

    return decorate


def _silence_stdout_if_broken() -> None:
    """A closed pipe must not turn the clean exit into exit 120 when Python flushes stdout."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


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
    client: EngineClient,
    flow_table_size: int,
    name_refresh_seconds: float = NAME_REFRESH_SECONDS,
    build_flows: bool = True,
) -> Iterator[Monitor]:
    """The rule store checked first, then the datapath on every container until the block ends.
    build_flows: whether anyone reads the Snapshots' flows (the agent without an export or
    metrics needs only the container totals)."""
    store = RuleStore()
    store.load()  # a corrupt store is refused before anything is attached
    with open_datapath(flow_table_size) as datapath:
        monitor = Monitor(
            datapath, client, store, name_refresh_seconds=name_refresh_seconds, build_flows=build_flows
        )
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
        require_enforceable(inventory, name)
        rule, replaced = store.add(
            name, dest, action=action, port=port_number, proto=proto, pending=inventory.find(name) is None
        )
        _enforce_saved_change(
            store,
            inventory,
            name,
            f"rule {rule.rule_id} ({name} {rule.summary()}) is saved in {store.path}",
            "run the same command again to apply it",
        )
        verb = "replaced" if replaced else "added"
        where = "" if inventory.find(name) else " (pending: applies when the container starts)"
        click.echo(f"{verb} rule {rule.rule_id}: {name} {rule.summary()}{where}")
        if read_live() is None:
            click.echo(
                f"{prog}: warning: no egress-agent is running: the rule will not follow {name} "
                "across a restart or re-creation until one runs ('egress-agent run')",
                err=True,
            )

    command.__doc__ = f"{action.capitalize()} a container's egress to DEST (address, CIDR or host name)."
    return command


def _enforce_saved_change(store: RuleStore, inventory: Inventory, name: str, saved: str, then: str) -> None:
    """The store already holds the change: if the datapath cannot take it (its lock stays
    held, the kernel refuses the program...), say exactly what state that leaves."""
    try:
        enforce_now(store, inventory, name)
    except UserError as exc:
        reason = exc.reason if isinstance(exc, LockBusy) else str(exc)
        raise UserError(
            f"{saved} but NOT in force in the kernel: {reason}; {then}", exc.exit_code, exc.detail
        ) from None


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
    ids = ", ".join(str(rule.rule_id) for rule in removed) or "none"
    _enforce_saved_change(
        store,
        inventory,
        name,
        f"rules removed from {store.path} ({ids})",
        "the kernel drops them at the next egress-block/egress-unblock or agent sync",
    )
    for rule in removed:
        click.echo(f"removed rule {rule.rule_id}: {name} {rule.summary()}")
    if not removed:
        click.echo(f"{name} had no rules")


class _ListUnlessSubcommand(click.Group):
    """`egress-rules [CONTAINER] [--json]` lists, as it always did; `egress-rules apply FILE`
    applies a rule file. (A container named like a subcommand: `egress-rules list NAME`.)"""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ListUnlessSubcommand, context_settings={"help_option_names": ["-h", "--help"]})
def egress_rules() -> None:
    """List rules (the default), or apply a rule file."""


@egress_rules.command("list")
@click.argument("container", required=False)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per rule per line.")
@reports_errors("egress-rules")
def list_rules(container: str | None, as_json: bool) -> None:
    """Every rule, with its hit counters (packets and bytes it dropped or allowed)."""
    rules = RuleStore().rules(container)
    hits = _rule_hits()
    states = live_states(rules) or {}
    rows = [rule_row(rule, hits.get(rule.rule_id), states.get(rule.container)) for rule in rules]
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        return
    click.echo(format_rules_table(rows))


@egress_rules.command("apply")
@click.argument("rule_file", metavar="FILE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--dry-run", is_flag=True, help="Print what would change (+/- lines); change nothing.")
@verbose_option
@reports_errors("egress-rules")
def apply_rules_file(rule_file: Path, dry_run: bool, verbose: bool) -> None:
    """Give each container named in FILE exactly the file's rules (JSON, or TOML if *.toml);
    containers the file does not name keep theirs. In force in the kernel when it returns."""
    wanted = load_rule_file(rule_file)
    store = RuleStore()
    if dry_run:
        diff = apply_rule_file(store, wanted, running=(), dry_run=True)
        click.echo("\n".join([*diff, f"dry run: {_changes(diff)} from {rule_file}; nothing was changed"]))
        return
    check_can_enforce()
    inventory = DockerInventory(connect_docker()).snapshot()
    diff = _apply_to_store(store, wanted, inventory)
    for name in wanted:
        _enforce_saved_change(
            store,
            inventory,
            name,
            f"the rules of {rule_file} are saved in {store.path}",
            "run the same command again to apply them",
        )
    click.echo("\n".join([*diff, f"applied {rule_file}: {_changes(diff)}"]))


def _apply_to_store(store: RuleStore, wanted: RuleFile, inventory: Inventory) -> list[str]:
    for name, rules in wanted.items():
        if rules:
            require_enforceable(inventory, name)  # refused before the store changes
    return apply_rule_file(store, wanted, running={c.name for c in inventory.containers})


def _changes(diff: list[str]) -> str:
    if not diff:
        return "no changes (every named container already has exactly these rules)"
    added = sum(line.startswith("+") for line in diff)
    return f"{added} rules added, {len(diff) - added} removed"


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
    client = connect_docker()
    if wanted is not None:
        # the store only: the datapath takes it when the monitor starts, below
        diff = _apply_to_store(RuleStore(), wanted, DockerInventory(client).snapshot())
        click.echo(f"egress-agent: applied {rules_path}: {_changes(diff)}", err=True)
    metrics = SnapshotMetrics(metrics_grace)
    with (
        # first: an unwritable file fails before attaching, and SIGHUP reopens from here on
        _export_sink(export_path, export_max_mb, export_keep) as sink,
        serving(listen, metrics) as stop_serving,  # a taken port fails here, before attaching
        _monitoring(
            client, flow_table_size, resolve_every, build_flows=export_path is not None or listen is not None
        ) as monitor,
    ):
        observed = [c for c in monitor.inventory.containers if c.endpoints]
        click.echo(
            f"egress-agent: ready: {len(observed)} containers observed, watching for new ones", err=True
        )
        try:
            for _ in _intervals(interval, None):
                snapshot = monitor.poll()
                status = monitor.status()
                publish(status)
                if listen is not None:
                    metrics.update(
                        snapshot, AgentHealth(status, monitor.attach_latency.read(), monitor.rule_hits)
                    )
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
