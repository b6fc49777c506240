"""`egress-agent run` as a child process: the one implementation the benchmarks and the
system tests (tests/runner.py) both start, watch and stop the agent with."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

BIN = Path(sys.executable).parent  # the venv's console scripts, beside its python
READY_PREFIX = "egress-agent: ready: "


class AgentFailed(AssertionError):
    """The agent (or another child of ours) exited, or did not get ready or stop in time. An
    AssertionError so that a test waiting on it fails as a test failure, with what it said."""


def stop_child(
    proc: subprocess.Popen[str],
    what: str,
    sig: int = signal.SIGTERM,
    timeout: float = 10.0,
    said: Callable[[], str] = lambda: "",
) -> int:
    """Signal a child (SIGTERM: as a service manager stops it) and reap it; its exit code.
    When it outlives the timeout: SIGABRT (a child run with PYTHONFAULTHANDLER=1 prints where
    every thread was stuck), then SIGKILL, and AgentFailed with what said() gives once it is
    gone (the caller knows who reads the child's stderr)."""
    if proc.poll() is None:
        proc.send_signal(sig)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise AgentFailed(f"{what} did not exit within {timeout:.0f} s of signal {sig}:\n{said()}") from None


class AgentProcess:
    """`egress-agent run ARGS` in the background (under `prefix`, e.g. setpriv); its stderr
    is collected line by line as it arrives, so a failure can say what the agent said."""

    def __init__(self, *args: str, prefix: tuple[str, ...] = ()):
        self.proc = subprocess.Popen(
            [*prefix, str(BIN / "egress-agent"), "run", *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.stderr_lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def said(self) -> str:
        return "\n".join(self.stderr_lines[-20:])[-2000:]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            self._reader.join(timeout=5)
            raise AgentFailed(f"egress-agent exited ({self.proc.returncode}): {self.said()}")

    def wait_ready(self, timeout: float = 30.0) -> str:
        """The ready line, once the agent printed it (it is watching from then on)."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            line = next((line for line in self.stderr_lines if line.startswith(READY_PREFIX)), None)
            if line is not None:
                return line
            if time.monotonic() > deadline:
                raise AgentFailed(f"egress-agent not ready within {timeout:.0f} s: {self.said()}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as a service manager stops it; returns the exit code."""
        code = stop_child(self.proc, "egress-agent", timeout=timeout, said=self._said_to_the_end)
        self._reader.join(timeout=5)
        return code

    def _said_to_the_end(self) -> str:
        self._reader.join(timeout=5)  # it has read everything once the process is gone
        return self.said()


def start_agent(*args: str, ready_within: float = 120.0) -> AgentProcess:
    """An agent that said it is ready (stopped again if it did not)."""
    agent = AgentProcess(*args)
    try:
        agent.wait_ready(ready_within)
    except AgentFailed:
        agent.stop()
        raise
    return agent
