"""Every way egress-top ends leaves nothing that enforces no rule: a terminal that hangs up,
SIGHUP, SIGQUIT, and the reader of its --json pipe going away (SIGPIPE)."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import signal
import socket
import stat
import struct
import subprocess
import termios
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from docker.models.containers import Container
from lab import UPSTREAM_V4, Lab, wait_until
from runner import BIN, Agent, nothing_left_behind, parse_records, veth_ifindexes

from agent.datapath import our_filters, pins_exist

PING_LOOP = f"for i in $(seq 1 600); do ping -c1 -W1 {UPSTREAM_V4}; sleep 0.05; done"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


def ingress_filters(ifindex: int) -> str:
    name = socket.if_indextoname(ifindex)
    return subprocess.run(
        ["tc", "filter", "show", "dev", name, "ingress"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def assert_attached(veths: set[int]) -> None:
    assert veths <= set(our_filters()) and pins_exist()
    assert all("egress_top_ingress" in ingress_filters(ifindex) for ifindex in veths)


def assert_nothing_of_ours(veths: set[int]) -> None:
    assert set(our_filters()) & veths == set()
    assert not pins_exist()
    assert all("egress_top_ingress" not in ingress_filters(ifindex) for ifindex in veths)


class TerminalSession:
    """egress-top's screen on a pseudo-terminal that is its controlling terminal, as in SSH."""

    def __init__(self) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))

        def own_terminal() -> None:  # in the child: a session whose controlling tty is the pty
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        self.proc = subprocess.Popen(
            [str(BIN / "egress-top"), "-i", "0.2"],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            preexec_fn=own_terminal,
            env={**os.environ, "TERM": "xterm-256color"},
        )
        os.close(slave)
        self.screen = bytearray()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:  # a terminal that nobody reads would block the screen's writes
        while True:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.screen += chunk

    def hang_up(self) -> None:
        """Close the terminal's side: the kernel sends SIGHUP to the session."""
        os.close(self.master)

    def wait(self) -> int:
        return self.proc.wait(timeout=15)


@pytest.mark.parametrize("how", ["terminal closes", "SIGHUP", "SIGQUIT"])
def test_egress_top_on_a_terminal_detaches_when_stopped(lab: Lab, upstream, how: str) -> None:
    container = lab.container("sig", network=lab.network())
    veths = veth_ifindexes(lab.pid(container))
    session = TerminalSession()
    try:
        wait_until(lambda: veths <= set(our_filters()) and pins_exist(), timeout=15)
        assert_attached(veths)  # the control: it was on the veth while running
        wait_until(lambda: b"containers" in session.screen, timeout=10)  # the screen is up
        if how == "terminal closes":
            session.hang_up()
            session.wait()  # its exit code cannot be reported to a terminal that is gone
        else:
            session.proc.send_signal(signal.SIGHUP if how == "SIGHUP" else signal.SIGQUIT)
            assert session.wait() == 0, bytes(session.screen[-2000:]).decode(errors="replace")
    finally:
        if session.proc.poll() is None:
            session.proc.kill()
            session.proc.wait()
        if how != "terminal closes":
            os.close(session.master)
    assert_nothing_of_ours(veths)


def pinger(lab: Lab) -> Container:
    return lab.container("pipe", network=lab.network(), command=["sh", "-c", PING_LOOP])


def test_json_pipe_closed_by_its_reader_detaches(lab: Lab, upstream) -> None:
    container = pinger(lab)
    veths = veth_ifindexes(lab.pid(container))
    result = subprocess.run(
        ["bash", "-c", f'set -o pipefail; {BIN / "egress-top"} --json -i 0.1 | grep -m1 \'"type":"flow"\''],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    record = json.loads(result.stdout)
    assert record["container_name"] == container.name and record["ifindex"] in veths  # it was attached
    assert_nothing_of_ours(veths)  # bash waited for both ends of the pipe: egress-top has exited


def test_agent_reopens_its_export_on_sighup_stops_on_sigterm_and_the_file_is_0640(
    lab: Lab, upstream, tmp_path: Path
) -> None:
    """A daemon's SIGHUP means reopen your log (logrotate's postrotate sends it), not stop:
    the agent keeps running and writing (tests/test_system_export_rotation.py rotates)."""
    container = pinger(lab)
    veths = veth_ifindexes(lab.pid(container))
    export = tmp_path / "flows.ndjson"
    agent = Agent("-i", "0.2", "--export", str(export))
    try:
        agent.wait_ready()
        wait_until(lambda: export.exists() and export.stat().st_size > 0, timeout=10)
        assert_attached(veths)
        export.rename(tmp_path / "flows.ndjson.1")
        agent.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: export.exists() and export.stat().st_size > 0, timeout=10)  # reopened by path
        assert agent.proc.poll() is None, agent.stderr_lines
        assert agent.stop() == 0, agent.stderr_lines
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
    assert stat.S_IMODE(export.stat().st_mode) == 0o640
    assert parse_records(export.read_text())[0]["container_name"] == container.name
    assert_nothing_of_ours(veths)  # no rule: nothing stays
