"""egress-block/egress-allow --dry-run: which live flows a rule change would cut or let
through, found by applying it to a scratch copy of the store. Changes nothing."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from agent.datapath import open_pinned_maps
from agent.enforcement import flows_of, verdict_changes
from agent.model import PROTO_NAMES, FlowKey, Inventory
from agent.policy import RuleStore


def print_dry_run(
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
