"""The live screen on fixed data: exact text, every key, a real pty, and speed."""

from __future__ import annotations

import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from dataclasses import replace

from rich.console import Console
from snapshots import DB, SNAPSHOT, WEB, WEB_STATS

from agent.model import Container, ContainerStats, Endpoint, Snapshot, TableFill
from agent.tui import HostInfo, ViewState, handle_key, render, visible_stats

HOST = HostInfo("box", "6.18.0")
IDS = [WEB.id, DB.id]  # rate order


def screen(snapshot: Snapshot, state: ViewState, width: int = 150) -> list[str]:
    console = Console(width=width, record=True, color_system=None, force_terminal=False, file=io.StringIO())
    console.print(render(snapshot, state, HOST))
    return [line.rstrip() for line in console.export_text().splitlines()]


def test_screen_exact_text() -> None:
    lines = screen(SNAPSHOT, ViewState())
    assert lines[0].startswith("egress-top box ") and lines[0].endswith(
        "containers 2 observed, 2 not egress 2.0 Mb/s flows 3/65536 (2 evicted)  kernel 6.18.0"
    )
    assert lines[1] == "sort rate ↓  (? for help, q to quit)"
    assert lines[2].split() == [
        "CONTAINER",
        "IMAGE",
        "ADDRESSES",
        "RATE",
        "BYTES",
        "PKT/S",
        "FLOWS",
        "DROPS",
        "HISTORY",
    ]
    assert lines[3].split()[:9] == [
        "web",
        "(frontend)",
        "+1",
        "shari…",
        "img:1",
        "172.20.0.2",
        "2.0",
        "Mb/s",
        "3.0",
    ]
    assert lines[4].split()[0] == "a-database-with-a-very-…"  # truncated, not wrapped
    # the selected container (the first) has its flows below the table
    assert lines[5] == "web: top 2 of 2 active flows"
    assert lines[6].split() == ["DESTINATION", "NAME", "KIND", "PROTO", "RATE", "BYTES", "AGE", "VERDICT"]
    assert lines[7].split() == [
        "198.51.100.7:443",
        "-",
        "external",
        "tcp",
        "1.6",
        "Mb/s",
        "1.9",
        "MiB",
        "2m05s",
        "forwarded",
    ]
    assert lines[8].split() == [
        "[2001:db8::1]:53",
        "-",
        "external",
        "udp",
        "400.0",
        "Kb/s",
        "58.6",
        "KiB",
        "2m05s",
        "dropped",
    ]
    assert lines[9] == "not observed"
    assert lines[10].split(None, 1) == ["agent", "host network: its traffic crosses no veth"]
    assert lines[11].split(None, 1) == ["sidecar", "shares the network namespace of web (counted there)"]


def test_selection_expansion_filter_pause_on_screen() -> None:
    state = ViewState(selected=1)
    lines = screen(SNAPSHOT, state)
    assert "a-database-with-a-very-long-name: top 0 of 1 active flows" in lines
    assert "web: top 2 of 2 active flows" not in lines
    both = screen(SNAPSHOT, replace(state, expanded=frozenset({WEB.id})))
    assert (
        "web: top 2 of 2 active flows" in both
        and "a-database-with-a-very-long-name: top 0 of 1 active flows" in both
    )
    filtered = screen(SNAPSHOT, ViewState(name_filter="front", paused=True))
    assert filtered[1] == "sort rate ↓  filter: front  PAUSED  (? for help, q to quit)"
    assert not any(line.startswith("a-database") for line in filtered)


def test_help_overlay_lists_every_key() -> None:
    text = "\n".join(screen(SNAPSHOT, ViewState(show_help=True)))
    for key in ("q", "s  >", "<", "r", "/", "Esc", "↑ ↓  k j", "Enter", "p", "?"):
        assert f"│  {key} " in text, key


def test_keys() -> None:
    state = ViewState()
    assert handle_key(state, "q", IDS) is None
    assert handle_key(state, "s", IDS).sort == "bytes"  # type: ignore[union-attr]
    assert handle_key(state, ">", IDS).sort == "bytes"  # type: ignore[union-attr]
    assert handle_key(state, "<", IDS).sort == "name"  # type: ignore[union-attr]
    assert handle_key(state, "r", IDS).reverse is True  # type: ignore[union-attr]
    assert handle_key(state, "p", IDS).paused is True  # type: ignore[union-attr]
    assert handle_key(state, "?", IDS).show_help is True  # type: ignore[union-attr]
    assert handle_key(ViewState(show_help=True), "x", IDS) == ViewState()  # any key closes help
    down = handle_key(state, "\x1b[B", IDS)
    assert down.selected == 1 and handle_key(down, "\x1b[B", IDS).selected == 1  # type: ignore[union-attr]
    assert handle_key(down, "\x1b[A", IDS).selected == 0 and handle_key(down, "k", IDS).selected == 0  # type: ignore[union-attr]
    assert handle_key(state, "j", IDS).selected == 1  # type: ignore[union-attr]
    expanded = handle_key(down, "\r", IDS)
    assert expanded.expanded == {DB.id}  # type: ignore[union-attr]
    assert handle_key(expanded, "\r", IDS).expanded == frozenset()  # type: ignore[arg-type,union-attr]


def test_filter_editing() -> None:
    state = handle_key(ViewState(), "/", IDS)
    for key in "databx":
        state = handle_key(state, key, IDS)  # type: ignore[arg-type]
    state = handle_key(state, "\x7f", IDS)  # type: ignore[arg-type]
    assert (state.name_filter, state.editing_filter) == ("datab", True)  # type: ignore[union-attr]
    typed_q = handle_key(state, "q", IDS)  # type: ignore[arg-type]
    assert typed_q is not None and typed_q.name_filter == "databq"  # q types while editing, it does not quit
    accepted = handle_key(state, "\r", IDS)  # type: ignore[arg-type]
    assert (accepted.name_filter, accepted.editing_filter) == ("datab", False)  # type: ignore[union-attr]
    assert [s.container.name for s in visible_stats(SNAPSHOT, accepted)] == [DB.name]  # type: ignore[arg-type]
    assert handle_key(accepted, "\x1b", IDS).name_filter == ""  # type: ignore[arg-type,union-attr]
    assert handle_key(state, "\x1b", IDS).name_filter == ""  # type: ignore[arg-type,union-attr]


def big_snapshot(containers: int = 200, flows: int = 50_000) -> Snapshot:
    per = flows // containers
    stats = []
    for n in range(containers):
        owner = Container(
            id=f"{n:064x}",
            name=f"service-{n}",
            image="app:1",
            endpoints=(Endpoint(100 + n, f"v{n}", "net", "br", f"10.1.{n // 250}.{n % 250}"),),
        )
        template = WEB_STATS.flows[0]
        owned = [replace(template, container=owner, bytes_delta=per - i) for i in range(per)]
        stats.append(
            ContainerStats(
                owner,
                bytes_total=n * 1000,
                bytes_delta=n,
                active_flows=per,
                flows=owned,
                rate_history=tuple(float(i) for i in range(30)),
            )
        )
    return Snapshot(
        time=SNAPSHOT.time,
        interval=1.0,
        stats=tuple(stats),
        unobservable=(),
        table=TableFill(flows, 65536, 0),
    )


def fastest_render(snapshot: Snapshot, state: ViewState, runs: int = 3) -> tuple[list[str], float]:
    """The screen's lines, and the shortest of `runs` renders of it (seconds)."""
    timings = []
    for _ in range(runs):
        started = time.perf_counter()
        lines = screen(snapshot, state, width=200)
        timings.append(time.perf_counter() - started)
    return lines, min(timings)


def test_render_time_does_not_grow_with_the_flows_held() -> None:
    """The screen shows each container's row and the top flows of the expanded ones, so
    50,000 flows render as fast as 2,000: timed against each other in the same run, not
    against a wall-clock budget (rich's rendering of the same rows takes 0.2-0.35 s from
    one machine to another)."""
    many, few = big_snapshot(flows=50_000), big_snapshot(flows=2_000)
    state = ViewState(expanded=frozenset(s.container.id for s in many.stats[:10]))
    lines, many_seconds = fastest_render(many, state)
    _, few_seconds = fastest_render(few, state)
    # header 2 + column titles 1 + 200 rows, then title + column titles + 5 flows for the
    # selected container (the busiest, service-199) and each of the 10 expanded ones
    titles = [line for line in lines if line.endswith(": top 5 of 250 active flows")]
    assert titles == [f"service-{n}: top 5 of 250 active flows" for n in (199, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0)]
    assert len(lines) == 2 + 1 + 200 + 11 * (2 + 5)
    assert many_seconds < 1.5 * few_seconds, f"50,000 flows: {many_seconds:.3f} s, 2,000: {few_seconds:.3f} s"


LIVE_SCRIPT = """
import sys
import termios
sys.path.insert(0, sys.argv[1])
from snapshots import SNAPSHOT
from agent.tui import HostInfo, ViewState, run_live
sys.exit(run_live(lambda: SNAPSHOT, 0.2, None, ViewState(), color=False, host=HostInfo("box", "6.18.0")))
"""


def test_run_live_in_a_real_pty_quits_on_q_and_restores_the_terminal() -> None:
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))  # rows, columns
    os.set_blocking(parent, False)
    proc = subprocess.Popen(
        [sys.executable, "-c", LIVE_SCRIPT, os.path.dirname(__file__)],
        stdin=child,
        stdout=child,
        stderr=child,
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
    )
    os.close(child)
    output = b""

    def read_until(marker: bytes, timeout: float) -> None:
        nonlocal output
        deadline = time.monotonic() + timeout
        while marker not in output and time.monotonic() < deadline:
            if select.select([parent], [], [], 0.1)[0]:
                try:
                    output += os.read(parent, 65536)
                except OSError:
                    break

    try:
        read_until(b"sort rate", timeout=10)
        os.write(parent, b"s")
        read_until(b"sort bytes", timeout=5)
        assert b"sort bytes" in output
        os.write(parent, b"q")
        started = time.monotonic()
        assert proc.wait(timeout=2) == 0
        assert time.monotonic() - started < 2
        read_until(b"\x1b[?1049l", timeout=1)
        assert b"\x1b[?1049l" in output  # left the alternate screen
    finally:
        proc.kill()
        os.close(parent)


FAILING_SCRIPT = """
import itertools, sys
sys.path.insert(0, sys.argv[1])
from snapshots import SNAPSHOT
from agent.tui import HostInfo, ViewState, run_live
polls = itertools.count(1)
def poll():
    if next(polls) == 3:
        raise RuntimeError("the flow table went away")
    return SNAPSHOT
run_live(poll, 0.2, None, ViewState(), color=True, host=HostInfo("box", "6.18.0"))
"""


def test_run_live_restores_the_terminal_when_an_error_ends_it() -> None:
    """An exception out of a refresh: the terminal is back as it was (cbreak undone, main
    screen, cursor shown) before the error is printed."""
    parent, child = pty.openpty()
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 150, 0, 0))
    settings = termios.tcgetattr(child)
    proc = subprocess.Popen(
        [sys.executable, "-c", FAILING_SCRIPT, os.path.dirname(__file__)],
        stdin=child,
        stdout=child,
        stderr=child,
        env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")},
    )
    output = b""
    try:
        deadline = time.monotonic() + 10
        # the traceback can arrive in pieces: read until its last line is in
        while b"RuntimeError: the flow table went away" not in output and time.monotonic() < deadline:
            if select.select([parent], [], [], 0.1)[0]:
                output += os.read(parent, 65536)
        assert proc.wait(timeout=5) == 1
        assert termios.tcgetattr(child) == settings
    finally:
        proc.kill()
        os.close(parent)
        os.close(child)
    shown = output.rindex(b"\x1b[?1049h")  # the alternate screen was entered ...
    left = output.index(b"\x1b[?1049l", shown)  # ... and left, with the cursor shown again
    assert b"\x1b[?25h" in output[shown:]
    assert output.index(b"RuntimeError: the flow table went away") > left
