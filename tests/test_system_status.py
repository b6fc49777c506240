"""What is and is not enforced, said out loud: egress-agent status, egress-rules' STATE,
egress-block's warning, and the refusals of rules nothing could enforce."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import UPSTREAM_V4_BLOCKME, Lab, network_of_driver, wait_until
from runner import Agent, only_enforcement_left_behind, run_cli

from agent.agent_status import read_live


@pytest.fixture(autouse=True)
def state_dir(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from only_enforcement_left_behind(tmp_path, monkeypatch)


def states() -> dict[str, str]:
    rows = [json.loads(line) for line in run_cli("egress-rules", "--json").stdout.splitlines()]
    return {row["container"]: row["state"] for row in rows}


def test_status_without_an_agent_exits_1_and_egress_block_warns(lab: Lab) -> None:
    web = lab.container("web", network=lab.network())
    status = run_cli("egress-agent", "status")
    assert status.returncode == 1 and "not running" in status.stdout

    block = run_cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
    assert block.returncode == 0, block.stderr
    assert "no egress-agent is running" in block.stderr and "restart" in block.stderr
    assert states() == {web.name: "enforced on 1 veths"}


def test_status_and_rule_states_with_the_agent(lab: Lab, agent) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    block = run_cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
    assert block.returncode == 0 and "no egress-agent" not in block.stderr, block.stderr
    wait_until(lambda: (s := read_live()) and s.containers_enforced == [web.name], timeout=10)

    healthy = run_cli("egress-agent", "status")
    assert healthy.returncode == 0, healthy.stdout
    assert f"pid {agent.pid}" in healthy.stdout and "healthy" in healthy.stdout
    assert "rules enforced: 1 of 1" in healthy.stdout and "not enforced: 0" in healthy.stdout
    assert "refresh retries:" in healthy.stdout

    # a second agent would fight the first over the veths: refused before it changes anything
    second = run_cli("egress-agent", "run")
    assert second.returncode == 2, second.stderr
    assert (
        second.stderr.strip()
        == f"egress-agent: another egress-agent is running (pid {agent.pid}): stop it first"
    )

    # A pending rule, then its container starts with no veth: said, not silent.
    later = f"{web.name}-host"
    assert run_cli("egress-block", "--pending", later, UPSTREAM_V4_BLOCKME).returncode == 0
    assert states()[later] == "pending: no such container running"
    lab.container("host", network_mode="host", name=later)
    wait_until(lambda: (s := read_live()) and later in s.not_enforced, timeout=10)
    unhealthy = run_cli("egress-agent", "status")
    assert unhealthy.returncode == 1
    assert f"{later}: container running but NOT enforced: host network" in unhealthy.stdout
    assert states() == {
        web.name: "enforced on 1 veths",
        later: "container running but NOT enforced: host network: its traffic crosses no veth",
    }
    table = run_cli("egress-rules").stdout
    assert f"WARNING: NOT enforced now: {later}" in table


def test_rules_nothing_could_enforce_are_refused(lab: Lab) -> None:
    net = lab.network()
    app = lab.container("app", network=net)
    sidecar = lab.container("sidecar", network_mode=f"container:{app.name}")
    on_host = lab.container("onhost", network_mode="host")
    isolated = lab.container("isolated", network_mode="none")

    shared = run_cli("egress-block", sidecar.name, "198.18.113.1")
    assert shared.returncode == 2 and len(shared.stderr.strip().splitlines()) == 1
    assert f"shares the network namespace of {app.name}" in shared.stderr
    assert f"put the rule on {app.name}" in shared.stderr
    for container, why in ((on_host, "host network"), (isolated, "network none")):
        refused = run_cli("egress-block", container.name, "198.18.113.1")
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1
        assert (
            f"{container.name} cannot be enforced ({why}" in refused.stderr
            and "no rule was added" in refused.stderr
        )
    assert run_cli("egress-rules", "--json").stdout == ""  # nothing was written
    # the owner takes the rule, and it binds the netns both share
    assert run_cli("egress-block", app.name, "198.18.113.1").returncode == 0


def test_a_rule_on_a_macvlan_container_is_refused_and_the_store_is_unchanged(
    macvlan_parent: str, lab: Lab, state_dir: Path
) -> None:
    app = lab.container("app", network=lab.network())
    macvlan = network_of_driver(lab, "macvlan", macvlan_parent, "198.18.11.0/24")
    on_macvlan = lab.container("onmacvlan", network=macvlan)
    assert run_cli("egress-block", app.name, "198.18.113.1").returncode == 0  # a store with a rule in it
    store = state_dir / "rules.json"
    before = hashlib.sha256(store.read_bytes()).hexdigest()

    refused = run_cli("egress-block", on_macvlan.name, "198.18.113.1")
    assert refused.returncode == 2 and refused.stdout == "", refused
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert (
        f"{on_macvlan.name} cannot be enforced (macvlan network {macvlan.name}: no host-side veth"
        in refused.stderr
        and "no rule was added" in refused.stderr
    ), refused.stderr
    assert hashlib.sha256(store.read_bytes()).hexdigest() == before
    assert list(states()) == [app.name]


def test_egress_block_right_after_ready_sees_the_agent(lab: Lab) -> None:
    """The agent publishes its status when it says ready, not after its first interval:
    egress-block run the moment "ready" is printed does not warn that no agent runs."""
    web = lab.container("web", network=lab.network())
    agent = Agent("-i", "30", "--metrics", "off")  # no interval ends here: only the ready publish counts
    try:
        agent.wait_ready()
        beside = run_cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
        assert beside.returncode == 0, beside.stderr
        assert "no egress-agent" not in beside.stderr, beside.stderr
    finally:
        assert agent.stop() == 0, agent.said()
    alone = run_cli("egress-block", web.name, "198.18.113.2")
    assert alone.returncode == 0, alone.stderr
    assert "no egress-agent is running" in alone.stderr and "restart" in alone.stderr, alone.stderr
