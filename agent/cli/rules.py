"""egress-block, egress-allow, egress-unblock: change one container's rules, in force in
the kernel when the command returns.

The fast path (the datapath pinned and on the container's veths) only writes the pinned
maps, so this room imports no more than that needs: the dry run's and the loader's
imports wait for the branch that uses them.
"""

from __future__ import annotations

import click

from agent.agent_status import read_live
from agent.cli.common import HELP_OPTIONS, reports_errors
from agent.enforcement import (
    check_can_enforce,
    enforce_now,
    require_enforceable,
    resolve_container_name,
)
from agent.errors import EXIT_USAGE, UserError
from agent.inventory import DockerInventory, connect_docker
from agent.lockfile import LockBusy
from agent.model import Inventory
from agent.policy import RuleStore

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

    @click.command(name=prog, context_settings=HELP_OPTIONS)
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
            from agent.cli.dry_run import print_dry_run
            from agent.datapath.system import check_privileges

            check_privileges()
            inventory = DockerInventory(connect_docker()).snapshot()
            name = resolve_container_name(inventory, container, pending)
            print_dry_run(store, inventory, name, dest, action, port_number, proto)
            return
        check_can_enforce()
        inventory = DockerInventory(connect_docker()).snapshot()
        name = resolve_container_name(inventory, container, pending)
        require_enforceable(inventory, name)
        rule, replaced = store.add(
            name, dest, action=action, port=port_number, proto=proto, pending=inventory.find(name) is None
        )
        enforce_saved_change(
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


def enforce_saved_change(store: RuleStore, inventory: Inventory, name: str, saved: str, then: str) -> None:
    """The store already holds the change: if the datapath cannot take it (its lock stays
    held, the kernel refuses the program...), say exactly what state that leaves."""
    try:
        enforce_now(store, inventory, name)
    except UserError as exc:
        reason = exc.reason if isinstance(exc, LockBusy) else str(exc)
        raise UserError(
            f"{saved} but NOT in force in the kernel: {reason}; {then}", exc.exit_code, exc.detail
        ) from None


egress_block = _rule_change_command("block", "egress-block")
egress_allow = _rule_change_command("allow", "egress-allow")


@click.command(context_settings=HELP_OPTIONS)
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
    enforce_saved_change(
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
