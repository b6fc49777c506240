"""The running agent's netlink is agent/rtnl (the standard library): attaching to a container
that starts while it runs (a link event, the veth's owner looked up, the filter added) and
detaching at exit never load pyroute2 (run under tests/audit_imports.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import Lab, wait_until
from runner import Agent, nothing_left_behind, veth_ifindexes

from agent.datapath import our_filters

pytestmark = pytest.mark.system


@pytest.fixture(autouse=True)
def clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


def test_attach_on_a_link_event_and_detach_at_exit_import_no_pyroute2(lab: Lab, tmp_path: Path) -> None:
    imports_log = tmp_path / "agent-imports.txt"
    audit = str(Path(__file__).with_name("audit_imports.py"))
    agent = Agent("-i", "0.2", prefix=(sys.executable, audit, str(imports_log)))
    try:
        agent.wait_ready()
        started = lab.container("late", network=lab.network())  # after the agent: its link events
        veths = veth_ifindexes(lab.pid(started))
        wait_until(lambda: veths <= set(our_filters()), timeout=10)
        assert agent.stop() == 0, agent.said()
    finally:
        if agent.proc.poll() is None:
            agent.proc.kill()
            agent.proc.wait()
    assert not veths & set(our_filters())  # detached at exit
    imported = set(imports_log.read_text().splitlines())
    assert {"agent.rtnl.link_events", "agent.veth_owner", "agent.datapath.attach"} <= imported  # control
    assert [name for name in imported if name.split(".")[0] == "pyroute2"] == []
