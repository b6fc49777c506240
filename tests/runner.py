"""Run the real egress-top CLI as a subprocess and read what it prints."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
from lab import wait_until

from agent.agent_status import read_live
from agent.datapath import PIN_DIR, open_pinned_maps, our_filters
from agent.export import SCHEMA_RESOURCES
from bench.agent_process import AgentProcess, stop_child

BIN = Path(sys.executable).parent
VALIDATORS = {
    record_type: jsonschema.Draft202012Validator(json.loads((files("agent.schema") / resource).read_text()))
    for record_type, resource in SCHEMA_RESOURCES.items()
}
Agent = AgentProcess  # `egress-agent run` in the background: one implementation with the bench's


def veth_ifindexes(pid: int) -> set[int]:
    """Host-side veth ifindex of each interface in a container's netns (its IFLA_LINK)."""
    from agent.inventory import _netns_links

    return {peer for _name, _mac, peer in _netns_links(f"/proc/{pid}/ns/net")}


def validate(record: dict[str, Any]) -> dict[str, Any]:
    """Checked against the schema of its type (flow, container or interval)."""
    VALIDATORS[record.get("type", "flow")].validate(record)
    return record


def parse_records(text: str, record_type: str = "flow") -> list[dict[str, Any]]:
    """The NDJSON lines of one record type, each line of every type schema-checked."""
    parsed = [validate(json.loads(line)) for line in text.splitlines()]
    return [record for record in parsed if record["type"] == record_type]


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
            env={**os.environ, "PYTHONFAULTHANDLER": "1"},  # stop_child's SIGABRT shows where it hung
        )
        self.records: list[dict[str, Any]] = []  # flow records
        self.arrival: list[float] = []  # time.time() each flow record was read
        self.others: list[dict[str, Any]] = []  # container and interval records
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.stderr = ""
        self.returncode: int | None = None

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            record = validate(json.loads(line))
            if record["type"] != "flow":
                self.others.append(record)
                continue
            self.records.append(record)
            self.arrival.append(time.time())

    def wait_attached(self, ifindexes: set[int], timeout: float = 15.0) -> None:
        """Until the veths carry our filter and this process has written its first interval:
        filters left by an earlier run are there at once, before this one handles signals."""

        def attached() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"egress-top exited early: {self.proc.stderr.read()}")  # type: ignore[union-attr]
            return ifindexes <= set(our_filters()) and any(r["type"] == "interval" for r in list(self.others))

        wait_until(attached, timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        stop_child(self.proc, "egress-top", sig, timeout, said=self._stderr_tail)
        self._reader.join(timeout=5)
        self.stderr = self.proc.stderr.read() if self.proc.stderr else ""  # type: ignore[union-attr]
        self.returncode = self.proc.returncode
        return self.proc.returncode

    def _stderr_tail(self) -> str:
        return self.proc.stderr.read()[-4000:] if self.proc.stderr else ""

    def flows_of(self, container_name: str) -> dict[tuple[Any, ...], dict[str, Any]]:
        """Latest record of each flow of a container, keyed by 5-tuple."""
        latest: dict[tuple[Any, ...], dict[str, Any]] = {}
        for record in self.records:
            if record["container_name"] == container_name:
                key = (record["src"], record["src_port"], record["dst"], record["dst_port"], record["proto"])
                latest[key] = record
        return latest

    def wait_for(self, predicate, timeout: float = 10.0) -> dict[str, Any]:  # type: ignore[no-untyped-def]
        """The first record, as they arrive, that satisfies predicate."""
        return wait_until(lambda: next((r for r in list(self.records) if predicate(r)), None), timeout)


# --- what a test leaves in the kernel --------------------------------------------------


def clsact_veths() -> set[str]:
    """Host veths carrying a clsact qdisc, as `tc qdisc show` lists them."""
    out = subprocess.run(
        ["tc", "-j", "qdisc", "show"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return {
        q["dev"] for q in json.loads(out or "[]") if q["kind"] == "clsact" and q["dev"].startswith("veth")
    }


def leftovers(clsact_before: set[str]) -> list[str]:
    """Ours still in the kernel: tc filters, pins, and clsact qdiscs that were not there before."""
    left = [f"our filter on {name}" for name in our_filters().values()]
    if PIN_DIR.parent.exists():
        left.append(f"pins under {PIN_DIR.parent}")
    left += [f"a clsact qdisc on {dev}" for dev in sorted(clsact_veths() - clsact_before)]
    return left


def remove_leftovers(clsact_before: set[str]) -> None:
    """egress-agent cleanup, then any clsact qdisc it did not take with it."""
    cleanup = run_cli("egress-agent", "cleanup")
    assert cleanup.returncode == 0, cleanup.stderr
    for dev in clsact_veths() - clsact_before:
        subprocess.run(["tc", "qdisc", "del", "dev", dev, "clsact"], capture_output=True, timeout=30)


def nothing_left_behind(tmp_path: Path, monkeypatch: Any) -> Iterator[Path]:
    """Body of a test's autouse fixture: a private rule store; afterwards, checked before any
    cleanup, nothing of ours is left in the kernel (the test that leaked fails), then cleanup."""
    monkeypatch.setenv("EGRESS_TOP_STATE_DIR", str(tmp_path / "state"))
    clsact_before = clsact_veths()
    yield tmp_path / "state"
    left = leftovers(clsact_before)
    remove_leftovers(clsact_before)
    assert not left, f"the test left behind: {', '.join(left)}"


def filters_enforcing_nothing() -> list[str]:
    """Our filters on veths that enforce no rule: what the last process out must have removed."""
    maps = open_pinned_maps()
    try:
        enforced = maps.policy_endpoints() if maps is not None else set()
    finally:
        if maps is not None:
            maps.close()
    return [
        f"our filter on {name} (no rule)" for index, name in our_filters().items() if index not in enforced
    ]


def only_enforcement_left_behind(tmp_path: Path, monkeypatch: Any) -> Iterator[Path]:
    """Body of an autouse fixture for tests that leave rules in force on purpose: a private
    rule store; afterwards, checked before any cleanup, every filter of ours still there
    enforces a rule; then `egress-agent cleanup` must leave nothing of ours at all."""
    monkeypatch.setenv("EGRESS_TOP_STATE_DIR", str(tmp_path / "state"))
    clsact_before = clsact_veths()
    yield tmp_path / "state"
    enforcing_nothing = filters_enforcing_nothing()
    remove_leftovers(clsact_before)
    left = leftovers(clsact_before)
    assert not enforcing_nothing and not left, f"left behind: {', '.join(enforcing_nothing + left)}"


def running_agent(*args: str) -> Iterator[subprocess.Popen[str]]:
    """Body of a fixture: `egress-agent run -i 0.2` until it has published its status; at the
    end SIGTERM, and it must exit 0."""
    proc = subprocess.Popen(
        [str(BIN / "egress-agent"), "run", "-i", "0.2", *args], stderr=subprocess.PIPE, text=True
    )
    try:
        wait_until(lambda: read_live() is not None or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=15)
        assert code == 0, proc.stderr.read() if proc.stderr else ""
