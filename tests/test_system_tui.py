"""The live screen for real: egress-top in tmux, a container pinging the upstream."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from lab import UPSTREAM_V4, Lab, wait_until
from runner import BIN, veth_ifindexes

from agent.datapath import PIN_DIR, our_filters


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], capture_output=True, text=True, check=True).stdout


def test_live_screen_shows_the_sender_sorts_and_quits(lab: Lab, upstream, tmp_path: Path) -> None:
    pinger = lab.container(
        "pinger",
        network=lab.network(),
        command=["sh", "-c", f"for i in $(seq 1 300); do ping -c 1 -W 1 {UPSTREAM_V4}; sleep 0.1; done"],
    )
    session = f"ett-tui-{pinger.short_id}"
    exit_file = tmp_path / "exit"
    command = f"{BIN / 'egress-top'} -i 0.5; echo $? > {exit_file}"
    tmux("new-session", "-d", "-s", session, "-x", "200", "-y", "40", command)
    try:

        def screen() -> str:
            return tmux("capture-pane", "-p", "-t", session)

        wait_until(lambda: veth_ifindexes(lab.pid(pinger)) <= set(our_filters()), timeout=15)

        def screen_with_flow() -> str:
            text = screen()
            return text if UPSTREAM_V4 in text and "sort rate" in text else ""

        text = wait_until(screen_with_flow, timeout=10)
        address = lab.ip(pinger)
        rows = [line for line in text.splitlines() if line.startswith(pinger.name) and address in line]
        assert len(rows) == 1, text
        row = rows[0]
        assert " b/s" in row or "Kb/s" in row
        assert " 0 b/s" not in row  # it is sending right now
        flow_line = next(line for line in text.splitlines() if line.startswith(UPSTREAM_V4))
        assert flow_line.split()[1:4] == ["-", "external", "icmp"]

        tmux("send-keys", "-t", session, "s")
        wait_until(lambda: "sort bytes" in screen(), timeout=3)

        tmux("send-keys", "-t", session, "q")
        pressed = time.monotonic()
        wait_until(exit_file.exists, timeout=2)
        assert time.monotonic() - pressed < 2
        assert exit_file.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    assert not our_filters() and not PIN_DIR.exists()
