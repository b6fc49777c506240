"""Run the real egress-top CLI as a subprocess and read what it prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema

from agent.datapath import our_filters

BIN = Path(sys.executable).parent
SCHEMA = json.loads((files("agent.schema") / "flow-record.v1.json").read_text())
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def veth_ifindexes(pid: int) -> set[int]:
    """Host-side veth ifindex of each interface in a container's netns (its IFLA_LINK)."""
    from agent.inventory import _netns_links

    return {peer for _name, _mac, peer in _netns_links(pid)}


def validate(record: dict[str, Any]) -> dict[str, Any]:
    VALIDATOR.validate(record)
    return record


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """Run one of our console scripts to completion."""
    command = [*prefix, str(BIN / args[0]), *args[1:]]
    return subprocess.run(
        command, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


class EgressTop:
    """egress-top --json in the background; records are parsed and schema-checked as they arrive."""

    def __init__(self, *args: str, interval: float = 0.25):
        self.proc = subprocess.Popen(
            [str(BIN / "egress-top"), "--json", "-i", str(interval), *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.records: list[dict[str, Any]] = []
        self.arrival: list[float] = []  # time.time() each record was read
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""
        self.returncode: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.records.append(validate(json.loads(line)))
            self.arrival.append(time.time())

    def wait_attached(self, ifindexes: set[int], timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"egress-top exited early: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            if ifindexes <= set(our_filters()):
                return
            time.sleep(0.05)
        raise AssertionError(f"egress-top did not attach to {ifindexes} within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"egress-top did not exit within {timeout}s of the signal") from None
        self._reader.join(timeout=5)
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""  # type: ignore[union-attr]
        self.returncode = self.proc.returncode
        return self.proc.returncode

    def flows_of(self, container_name: str) -> dict[tuple[Any, ...], dict[str, Any]]:
        """Latest record of each flow of a container, keyed by 5-tuple."""
        latest: dict[tuple[Any, ...], dict[str, Any]] = {}
        for record in self.records:
            if record["container_name"] == container_name:
                key = (record["src"], record["src_port"], record["dst"], record["dst_port"], record["proto"])
                latest[key] = record
        return latest

    def wait_for(self, predicate, timeout: float = 10.0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            new = self.records[seen:]
            seen += len(new)
            for record in new:
                if predicate(record):
                    return record
            time.sleep(0.05)
        raise AssertionError(f"no matching record within {timeout}s")
