"""egress-top's live screen: one row per container, the flows of the selected one below.

Layout: a header, the container table (the selected row highlighted), then a flow
table for the selected container and for every container expanded with Enter, then
the containers we cannot observe, dimmed, with the reason. Keys are handled by a
pure function (handle_key) so they can be tested without a terminal; run_live owns
the terminal and always restores it (q, Ctrl-C, SIGTERM, exceptions).
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from agent.model import ContainerStats, Snapshot, Verdict
from agent.plain import CONTAINER_WIDTHS, enforcement_warning, fit, header
from agent.rows import CONTAINER_COLUMNS, FLOW_COLUMNS, SORT_KEYS, container_cells, flow_cells, sorted_stats
from agent.units import sparkline

SORT_ORDER = tuple(SORT_KEYS)
HISTORY_WIDTH = 30
KEY_UP, KEY_DOWN, KEY_ESC, KEY_ENTER = "\x1b[A", "\x1b[B", "\x1b", "\r"
HELP = (
    ("q", "quit"),
    ("s  >", "next sort column"),
    ("<", "previous sort column"),
    ("r", "reverse the sort"),
    ("/", "filter by name or compose service (Enter keeps it, Esc clears it)"),
    ("Esc", "clear the filter"),
    ("↑ ↓  k j", "select a container: its flows are shown below the table"),
    ("Enter", "expand/collapse the selected container's flows (kept while you move on)"),
    ("p", "pause the display (counting goes on)"),
    ("?", "this help; any key closes it"),
)


@dataclass(frozen=True)
class ViewState:
    sort: str = "rate"
    reverse: bool = False
    name_filter: str = ""
    editing_filter: bool = False
    selected: int = 0
    expanded: frozenset[str] = field(default_factory=frozenset)  # container ids
    paused: bool = False
    show_help: bool = False
    flows_per_container: int = 5


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    kernel: str

    @classmethod
    def detect(cls) -> HostInfo:
        uname = os.uname()
        return cls(uname.nodename, uname.release)


def visible_stats(snapshot: Snapshot, state: ViewState) -> list[ContainerStats]:
    """The container rows on screen, filtered and sorted as the state says."""
    wanted = state.name_filter.lower()
    rows = sorted_stats(snapshot, state.sort, state.reverse)
    if wanted:
        rows = [
            s
            for s in rows
            if wanted in s.container.name.lower() or wanted in (s.container.compose_service or "").lower()
        ]
    return rows


def handle_key(state: ViewState, key: str, visible_ids: Sequence[str]) -> ViewState | None:
    """The state after a key press; None means quit."""
    if state.show_help:
        return replace(state, show_help=False)
    if state.editing_filter:
        return _edit_filter(state, key)
    last = max(0, len(visible_ids) - 1)
    sort_index = SORT_ORDER.index(state.sort)
    match key:
        case "q":
            return None
        case "s" | ">":
            return replace(state, sort=SORT_ORDER[(sort_index + 1) % len(SORT_ORDER)])
        case "<":
            return replace(state, sort=SORT_ORDER[(sort_index - 1) % len(SORT_ORDER)])
        case "r":
            return replace(state, reverse=not state.reverse)
        case "/":
            return replace(state, editing_filter=True)
        case "\x1b":
            return replace(state, name_filter="", selected=0)
        case "\x1b[A" | "k":
            return replace(state, selected=max(0, min(state.selected, last) - 1))
        case "\x1b[B" | "j":
            return replace(state, selected=min(last, state.selected + 1))
        case "\r" | "\n" if visible_ids:
            chosen = visible_ids[min(state.selected, last)]
            return replace(state, expanded=state.expanded ^ {chosen})
        case "p":
            return replace(state, paused=not state.paused)
        case "?":
            return replace(state, show_help=True)
    return state


def _edit_filter(state: ViewState, key: str) -> ViewState:
    if key == KEY_ESC:
        return replace(state, name_filter="", editing_filter=False, selected=0)
    if key in ("\r", "\n"):
        return replace(state, editing_filter=False, selected=0)
    if key in ("\x7f", "\b"):
        return replace(state, name_filter=state.name_filter[:-1])
    if key.isprintable():
        return replace(state, name_filter=state.name_filter + key)
    return state


def _header(snapshot: Snapshot, state: ViewState, host: HostInfo) -> Text:
    text = Text(f"{header(snapshot, host.hostname)}  kernel {host.kernel}", style="bold")
    warning = enforcement_warning(snapshot)
    if warning:
        text.append(f"\n{warning}", style="bold red")
    arrow = "↑" if (state.sort == "name") != state.reverse else "↓"
    text.append(f"\nsort {state.sort} {arrow}")
    if state.editing_filter:
        text.append(f"  filter: {state.name_filter}▏", style="yellow")
    elif state.name_filter:
        text.append(f"  filter: {state.name_filter}", style="yellow")
    if state.paused:
        text.append("  PAUSED", style="bold red")
    text.append("  (? for help, q to quit)", style="dim")
    return text


def _container_table(rows: list[ContainerStats], snapshot: Snapshot, state: ViewState) -> Table:
    table = Table(box=None, expand=True, pad_edge=False, header_style="bold")
    for number, title in enumerate((*CONTAINER_COLUMNS, "HISTORY")):
        numeric = 3 <= number <= 7
        table.add_column(
            title,
            justify="right" if numeric else "left",
            overflow="ellipsis",
            no_wrap=True,
            min_width=HISTORY_WIDTH if title == "HISTORY" else None,
        )
    for index, stats in enumerate(rows):
        style = "reverse" if index == min(state.selected, len(rows) - 1) else ""
        if stats.dropped_packets_delta:
            style += " red"
        history = sparkline(stats.rate_history, HISTORY_WIDTH)
        cells = container_cells(stats, snapshot.interval)
        # names, images and addresses are cut as in the plain output, never wrapped
        labels = tuple(fit(cell, width) for cell, width in zip(cells[:3], CONTAINER_WIDTHS, strict=False))
        table.add_row(*labels, *cells[3:], history, style=style.strip() or None)
    return table


def _flow_table(stats: ContainerStats, snapshot: Snapshot, state: ViewState) -> Table:
    shown = stats.flows[: state.flows_per_container]
    title = f"{stats.container.name}: top {len(shown)} of {stats.active_flows} active flows"
    table = Table(
        title=title, title_justify="left", box=None, expand=True, pad_edge=False, header_style="bold"
    )
    for number, title_text in enumerate(FLOW_COLUMNS):
        table.add_column(
            title_text, justify="right" if 4 <= number <= 6 else "left", overflow="ellipsis", no_wrap=True
        )
    for flow in shown:
        cells = flow_cells(flow, snapshot.interval, snapshot.time)
        # dropped, dropped_unparsed and held rows alike: the packet did not leave
        table.add_row(*cells, style=None if cells[-1] == Verdict.FORWARDED else "red")
    return table


def _help() -> Panel:
    table = Table(box=None, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for keys, meaning in HELP:
        table.add_row(keys, meaning)
    return Panel(table, title="egress-top keys", expand=False)


def render(snapshot: Snapshot, state: ViewState, host: HostInfo) -> RenderableType:
    if state.show_help:
        return _help()
    rows = visible_stats(snapshot, state)
    parts: list[RenderableType] = [_header(snapshot, state, host), _container_table(rows, snapshot, state)]
    selected = rows[min(state.selected, len(rows) - 1)].container.id if rows else None
    for stats in rows:
        if stats.container.id == selected or stats.container.id in state.expanded:
            parts.append(_flow_table(stats, snapshot, state))
    if snapshot.unattributed_flows:
        parts.append(
            Text(f"unmapped: {len(snapshot.unattributed_flows)} flows on veths not yet mapped", "dim")
        )
    if snapshot.unobservable:
        unobserved = Table(
            title="not observed", title_justify="left", box=None, show_header=False, style="dim"
        )
        unobserved.add_column(style="dim")
        unobserved.add_column(style="dim")
        for container in snapshot.unobservable:
            unobserved.add_row(container.name, container.why_not_observed)
        parts.append(unobserved)
    return Group(*parts)


def _split_keys(data: str) -> list[str]:
    """One read may hold several keys; an escape sequence is one key."""
    keys, index = [], 0
    while index < len(data):
        if data.startswith("\x1b[", index) and index + 2 < len(data):
            keys.append(data[index : index + 3])
            index += 3
        else:
            keys.append(data[index])
            index += 1
    return keys


@contextlib.contextmanager
def _cbreak(fd: int) -> Iterator[None]:
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        yield
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _resize_pipe() -> Iterator[int]:
    """SIGWINCH writes to a pipe the loop selects on, so a resize redraws at once."""
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.signal(signal.SIGWINCH, lambda *_: os.write(write_end, b"w"))
    try:
        yield read_end
    finally:
        signal.signal(signal.SIGWINCH, previous)
        os.close(read_end)
        os.close(write_end)


def run_live(
    poll: Callable[[], Snapshot],
    interval: float,
    count: int | None,
    state: ViewState,
    color: bool,
    host: HostInfo | None = None,
) -> int:
    """The interactive loop: poll on a fixed schedule, redraw on data, keys and resizes."""
    host = host or HostInfo.detect()
    console = Console(no_color=not color, highlight=False)
    stdin = sys.stdin.fileno()
    shown: Snapshot | None = None
    refreshes = 0
    with (
        _cbreak(stdin),
        _resize_pipe() as resized,
        Live(console=console, screen=True, auto_refresh=False) as live,
    ):

        def redraw() -> None:
            # The terminal's size, not COLUMNS/LINES: those are often stale and never follow a resize.
            with contextlib.suppress(OSError):
                size = os.get_terminal_size(sys.stdout.fileno())
                if size.columns and size.lines:  # a fresh pty may say 0x0 until someone sets it
                    console.width, console.height = size
            live.update(
                render(shown, state, host) if shown else Text("collecting the first interval…"), refresh=True
            )

        redraw()
        deadline = time.monotonic() + interval
        while True:
            ready, _, _ = select.select([stdin, resized], [], [], max(0.0, deadline - time.monotonic()))
            if resized in ready:
                os.read(resized, 64)
                redraw()
            if stdin in ready:
                visible_ids = [s.container.id for s in visible_stats(shown, state)] if shown else []
                for key in _split_keys(os.read(stdin, 64).decode(errors="ignore")):
                    new_state = handle_key(state, key, visible_ids)
                    if new_state is None:
                        return 0
                    state = new_state
                redraw()
            if time.monotonic() >= deadline:
                snapshot = poll()
                refreshes += 1
                if not state.paused or shown is None:
                    shown = snapshot
                redraw()
                if count is not None and refreshes >= count:
                    return 0
                deadline += interval
