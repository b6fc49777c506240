"""The loop egress-top and egress-agent run: the datapath on every container, one
Snapshot per interval, and the options that shape it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import click

from agent.datapath import DEFAULT_FLOW_TABLE_SIZE, open_datapath, start_loading
from agent.docker_api import EngineClient
from agent.enforcement import NAME_REFRESH_SECONDS
from agent.policy import RuleStore

if TYPE_CHECKING:
    from agent.monitor import Monitor


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


def intervals(interval: float, count: int | None) -> Iterator[int]:
    """Yield once per interval on a fixed schedule (no drift from the work done)."""
    deadline = time.monotonic()
    number = 0
    while count is None or number < count:
        deadline += interval
        time.sleep(max(0.0, deadline - time.monotonic()))
        number += 1
        yield number


@contextlib.contextmanager
def monitoring(
    client: EngineClient,
    flow_table_size: int,
    name_refresh_seconds: float = NAME_REFRESH_SECONDS,
    build_flows: bool = True,
) -> Iterator[Monitor]:
    """The rule store checked first, then the datapath on every container until the block ends.
    build_flows: whether anyone reads the Snapshots' flows (the agent without an export needs
    only the container totals and their egress by kind, which /metrics reads)."""
    store = RuleStore()
    store.load()  # a corrupt store is refused before anything is attached
    loading = start_loading(flow_table_size)
    from agent.monitor import Monitor  # imported (numpy...) while a first start compiles

    with open_datapath(flow_table_size, loading) as datapath:
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
