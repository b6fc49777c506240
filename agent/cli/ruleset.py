"""egress-rules: list every rule with its hits and live state, or apply a rule file
(the declarative form egress-agent run --apply-rules also takes)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from agent.cli.common import HELP_OPTIONS, reports_errors, verbose_option
from agent.cli.rules import enforce_saved_change
from agent.datapath import RuleHits, check_privileges, open_pinned_maps
from agent.enforcement import check_can_enforce, require_enforceable
from agent.enforcement_state import live_states
from agent.errors import UserError
from agent.inventory import DockerInventory, connect_docker
from agent.model import Inventory
from agent.policy import RuleFile, RuleStore, apply_rule_file, load_rule_file
from agent.rules_view import format_rules_table, rule_row


class _ListUnlessSubcommand(click.Group):
    """`egress-rules [CONTAINER] [--json]` lists, as it always did; `egress-rules apply FILE`
    applies a rule file. (A container named like a subcommand: `egress-rules list NAME`.)"""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("-h", "--help")):
            args = ["list", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_ListUnlessSubcommand, context_settings=HELP_OPTIONS)
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
        summary = f"dry run: {describe_changes(diff)} from {rule_file}; nothing was changed"
        click.echo("\n".join([*diff, summary]))
        return
    check_can_enforce()
    inventory = DockerInventory(connect_docker()).snapshot()
    diff = apply_to_store(store, wanted, inventory)
    for name in wanted:
        enforce_saved_change(
            store,
            inventory,
            name,
            f"the rules of {rule_file} are saved in {store.path}",
            "run the same command again to apply them",
        )
    click.echo("\n".join([*diff, f"applied {rule_file}: {describe_changes(diff)}"]))


def apply_to_store(store: RuleStore, wanted: RuleFile, inventory: Inventory) -> list[str]:
    for name, rules in wanted.items():
        if rules:
            require_enforceable(inventory, name)  # refused before the store changes
    return apply_rule_file(store, wanted, running={c.name for c in inventory.containers})


def describe_changes(diff: list[str]) -> str:
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
