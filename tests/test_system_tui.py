"""The live screen for real: egress-top in tmux, containers pinging the upstream."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from lab import UPSTREAM_V4, Lab, wait_until
from runner import BIN, nothing_left_behind, run_cli, veth_ifindexes

from agent.datapath import our_filters

PING_IP_BYTES = 84  # busybox ping: 56 bytes of data + ICMP 8 + IPv4 20
PINGS = 30
PING_GAP = 0.1
SGR = re.compile(r"\x1b\[([0-9;]*)m")
T = TypeVar("T")


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


class Pane:
    """egress-top in a detached tmux session, from a bash that records what happens around it:
    the terminal settings before and after, and egress-top's exit code."""

    def __init__(self, name: str, tmp_path: Path, args: str, env: str = "", width: int = 200) -> None:
        self.session = name
        self.exit_file, self.before, self.after = (
            tmp_path / n for n in ("exit", "stty-before", "stty-after")
        )
        state = os.environ["EGRESS_TOP_STATE_DIR"]
        script = (
            f"stty -g > {self.before}; env EGRESS_TOP_STATE_DIR={state} {env} {BIN / 'egress-top'} {args};"
            f" echo $? > {self.exit_file}; stty -g > {self.after}; exec sleep 600"
        )
        tmux("new-session", "-d", "-s", name, "-x", str(width), "-y", "40", "bash", "-c", script)

    def text(self, escapes: bool = False) -> str:
        return tmux("capture-pane", "-p", *(["-e"] if escapes else []), "-t", self.session)

    def lines_starting(self, prefix: str, escapes: bool = False) -> list[str]:
        return [line for line in self.text(escapes).splitlines() if SGR.sub("", line).startswith(prefix)]

    def rows_of(self, name: str, escapes: bool = False) -> list[str]:
        """The container's row (not the title of its flow table, "NAME: top …")."""
        return self.lines_starting(f"{name} ", escapes)

    def wait_for(self, predicate: Callable[[], T], timeout: float, interval: float = 0.05) -> T:
        """wait_until, and on failure the screen in the message."""
        try:
            return wait_until(predicate, timeout, interval)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen:\n{self.text()}") from None

    def keys(self, *keys: str) -> None:
        tmux("send-keys", "-t", self.session, *keys)

    def egress_top_pid(self) -> int:
        shell = int(tmux("display", "-p", "-t", self.session, "#{pane_pid}"))
        (child,) = Path(f"/proc/{shell}/task/{shell}/children").read_text().split()
        return int(child)

    def wait_exit(self, timeout: float) -> int:
        wait_until(lambda: self.after.exists() and self.after.read_text(), timeout)
        return int(self.exit_file.read_text())

    def terminal_restored(self) -> tuple[str, str]:
        """(alternate screen on, cursor shown) as tmux tracks them, after egress-top left."""
        return tuple(tmux("display", "-p", "-t", self.session, "#{alternate_on} #{cursor_flag}").split())  # type: ignore[return-value]

    def close(self) -> None:
        """Stop egress-top if a failed test left it running, and wait: it cleans up on exit."""
        if not self.after.exists():
            with contextlib.suppress(Exception):
                os.kill(self.egress_top_pid(), signal.SIGTERM)
                self.wait_exit(timeout=10)
        subprocess.run(["tmux", "kill-session", "-t", self.session], capture_output=True)


@pytest.fixture
def pane_factory(tmp_path: Path) -> Iterator[Callable[..., Pane]]:
    opened: list[Pane] = []

    def open_pane(name: str, args: str, env: str = "", width: int = 200) -> Pane:
        pane = Pane(name, tmp_path, args, env, width)
        opened.append(pane)
        return pane

    yield open_pane
    for pane in opened:
        pane.close()


def pinger(lab: Lab, hint: str, pings: int = PINGS, start: bool = True):  # type: ignore[no-untyped-def]
    loop = f"ping -q -c {pings} -i {PING_GAP} {UPSTREAM_V4}; exec sleep 600"
    return lab.container(hint, network=lab.network(), command=["sh", "-c", loop], start=start)


def cells(row: str) -> list[str]:
    """name image address rate unit bytes unit pkt/s flows drops history"""
    return row.split()


def test_live_screen_counts_the_sender_exactly_sorts_and_quits(lab: Lab, upstream, pane_factory) -> None:
    sender = pinger(lab, "pinger", start=False)
    pane = pane_factory(f"ett-tui-{sender.short_id}", "-i 0.5")
    pane.wait_for(lambda: "sort rate" in pane.text(), timeout=30)  # up: the watcher follows new veths
    sender.start()
    wait_until(lambda: veth_ifindexes(lab.pid(sender)) <= set(our_filters()), timeout=5)
    address = lab.ip(sender)

    def sending_row() -> list[str] | None:
        rows = pane.rows_of(sender.name)
        return cells(rows[0]) if len(rows) == 1 and cells(rows[0])[3] != "0" else None

    row = pane.wait_for(sending_row, timeout=10)
    assert row[1:3] == ["egress-top-test/bus…", address]
    rate = float(row[3]) * {"b/s": 1, "Kb/s": 1e3}[row[4]]
    # pings PING_GAP apart: at most 6 in one 0.5 s interval
    assert 0 < rate <= 6 * PING_IP_BYTES * 8 / 0.5, row
    flow_line = next(line for line in pane.text().splitlines() if line.startswith(UPSTREAM_V4))
    assert flow_line.split()[1:4] == ["-", "external", "icmp"]

    # every echo request, the first included: 30 x 84 B = 2520 B (the screen rounds to 0.1 KiB), then idle
    def done_row() -> list[str] | None:
        rows = pane.rows_of(sender.name)
        return (
            cells(rows[0])
            if rows and cells(rows[0])[3:10] == ["0", "b/s", "2.5", "KiB", "0", "0", "0"]
            else None
        )

    pane.wait_for(done_row, timeout=PINGS * PING_GAP + 10)

    pane.keys("s")
    pane.wait_for(lambda: "sort bytes" in pane.text(), timeout=3)
    pane.keys("q")
    pressed = time.monotonic()
    assert pane.wait_exit(timeout=3) == 0
    assert time.monotonic() - pressed < 2


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm"])
def test_terminal_is_restored_and_the_screen_follows_a_resize(
    lab: Lab, upstream, pane_factory, how: str
) -> None:
    sender = pinger(lab, "resize", pings=300)
    interval = 3.0  # a redraw well before the next refresh comes from SIGWINCH, not the timer
    pane = pane_factory(f"ett-tui-{sender.short_id}", f"-i {interval}")
    pane.wait_for(lambda: pane.rows_of(sender.name), timeout=30)  # the first refresh
    refreshed = time.monotonic()

    def history_column() -> int | None:
        titles = pane.lines_starting("CONTAINER")
        return titles[0].index("HISTORY") if len(titles) == 1 else None  # None: mid-redraw

    wide = wait_until(history_column, timeout=1)
    tmux("resize-window", "-t", pane.session, "-x", "120", "-y", "30")
    narrow = wait_until(
        lambda: history_column() not in (None, wide) and history_column(), timeout=interval / 2
    )
    assert time.monotonic() - refreshed < interval
    assert narrow < wide and max(len(line) for line in pane.text().splitlines()) <= 120

    if how == "ctrl-c":
        pane.keys("C-c")
    else:
        os.kill(pane.egress_top_pid(), signal.SIGTERM)
    assert pane.wait_exit(timeout=5) == 0
    assert pane.terminal_restored() == ("0", "1")  # main screen, cursor shown
    assert pane.after.read_text() == pane.before.read_text()  # termios settings as they were


def colours(line: str) -> list[str]:
    """The colours the SGR sequences of a captured line set (30-38, 40-48, 90-107; 39 and 49
    are tmux's resets to the default colours)."""
    found = []
    for params in SGR.findall(line):
        for param in params.split(";"):
            if param and int(param) not in (39, 49) and (30 <= int(param) <= 48 or 90 <= int(param) <= 107):
                found.append(param)
    return found


@pytest.mark.parametrize("no_color", [False, True])
def test_a_row_with_drops_is_red_unless_no_color(lab: Lab, upstream, pane_factory, no_color: bool) -> None:
    blocked, calm = pinger(lab, "blocked", pings=300), pinger(lab, "calm", pings=300)
    rule = run_cli("egress-block", blocked.name, UPSTREAM_V4, "--proto", "icmp")
    assert rule.returncode == 0, rule.stderr
    samples: list[tuple[str, str]] = []  # (blocked row, calm row) with their escape sequences
    try:
        env = "NO_COLOR=1" if no_color else ""
        pane = pane_factory(f"ett-tui-{blocked.short_id}", "-i 0.5 --sort name", env=env)

        def sample() -> bool:
            dropping, passing = pane.rows_of(blocked.name, True), pane.rows_of(calm.name, True)
            if len(dropping) == 1 and len(passing) == 1 and cells(SGR.sub("", dropping[0]))[9] != "0":
                samples.append((dropping[0], passing[0]))
            return len(samples) >= 6  # 0.25 s apart: three intervals, each with drops

        pane.wait_for(sample, timeout=30, interval=0.25)
        pane.keys("q")
        assert pane.wait_exit(timeout=3) == 0
    finally:
        assert run_cli("egress-unblock", blocked.name, "--all").returncode == 0
    for dropping, passing in samples:
        assert colours(passing) == [], repr(passing)
        assert colours(dropping) == ([] if no_color else ["31"]), repr(dropping)  # red, or no colour
