"""README's promises about the agent and egress-top's command line, on real dockerd and BPF:
the agent's ready line and --export, a foreign clsact qdisc left alone, -c by compose
service and by id prefix."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.models.containers import Container
from lab import RUN, UPSTREAM_V4, UPSTREAM_V4_BLOCKME, Lab, wait_until
from runner import (
    BIN,
    Agent,
    EgressTop,
    clsact_veths,
    leftovers,
    nothing_left_behind,
    parse_records,
    run_cli,
    validate,
    veth_ifindexes,
)

from agent.datapath import our_filters

UDP4_OVERHEAD = 28  # IPv4 + UDP headers


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    """A private rule store; the leftover check runs while the lab's veths still exist."""
    yield from nothing_left_behind(tmp_path, monkeypatch)


def test_the_leftover_check_sees_a_filter_pins_and_a_qdisc(lab: Lab) -> None:
    """The check every test here ends with can fail: a rule in force leaves all three."""
    web = lab.container("web", network=lab.network())
    veth = socket.if_indextoname(next(iter(veth_ifindexes(lab.pid(web)))))
    before = clsact_veths()
    assert leftovers(before) == []
    blocked = run_cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
    assert blocked.returncode == 0, blocked.stderr
    assert leftovers(before) == [
        f"our filter on {veth}",
        "pins under /sys/fs/bpf/egress-top",
        f"a clsact qdisc on {veth}",
    ]
    unblocked = run_cli("egress-unblock", web.name, "--all")
    assert unblocked.returncode == 0, unblocked.stderr
    assert leftovers(before) == []


def observable_containers(lab: Lab) -> int:
    """Running containers with a veth of their own, as Docker reports them."""
    modes = [c.attrs["HostConfig"]["NetworkMode"] for c in lab.client.containers.list()]
    return sum(1 for mode in modes if mode not in ("host", "none") and not mode.startswith("container:"))


def records_of(path: Path, container: Container) -> list[dict[str, Any]]:
    return [r for r in parse_records(path.read_text()) if r["container_name"] == container.name]


def test_agent_says_ready_and_exports_each_datagram_once(lab: Lab, upstream, tmp_path: Path) -> None:
    web = lab.container("web", network=lab.network())
    sink = upstream.udp_sink(5801)
    export = tmp_path / "flows.ndjson"
    agent = Agent("-i", "0.2", "--export", str(export))
    try:
        ready = agent.wait_ready()
        assert ready == (
            f"egress-agent: ready: {observable_containers(lab)} containers observed, watching for new ones"
        )
        assert veth_ifindexes(lab.pid(web)) <= set(our_filters())  # watching means attached
        src_port = lab.send_udp(web, UPSTREAM_V4, 5801, count=5, size=40)
        sink.wait_for(5, timeout=5)

        def flow_records() -> list[dict[str, Any]]:
            return [r for r in records_of(export, web) if r["src_port"] == src_port]

        wait_until(lambda: sum(r["packets_delta"] for r in flow_records()) >= 5, timeout=5)
    finally:
        assert agent.stop() == 0, agent.stderr_lines
    assert agent.stderr_lines == [ready]  # one line, and nothing else on stderr
    for line in export.read_text().splitlines():
        validate(json.loads(line))
    flow = flow_records()
    assert sum(r["packets_delta"] for r in flow) == 5
    assert sum(r["bytes_delta"] for r in flow) == 5 * (40 + UDP4_OVERHEAD)
    last = flow[-1]
    assert (last["dst"], last["dst_port"], last["proto"], last["packets"]) == (UPSTREAM_V4, 5801, "udp", 5)
    assert (last["verdict"], last["dropped_packets"]) == ("forwarded", 0)
    assert sink.counts() == (5, 5 * 40)


def tc_lines(*args: str) -> list[str]:
    out = subprocess.run(["tc", *args], capture_output=True, text=True, check=True, timeout=30).stdout
    return out.splitlines()


def test_foreign_clsact_qdisc_and_filter_are_kept_on_exit(lab: Lab) -> None:
    web = lab.container("web", network=lab.network())
    [ifindex] = veth_ifindexes(lab.pid(web))
    veth = socket.if_indextoname(ifindex)
    subprocess.run(["tc", "qdisc", "add", "dev", veth, "clsact"], check=True, timeout=30)
    try:
        subprocess.run(
            # u32 matching everything, after ours (prio 1000 > 231): this kernel has no matchall/gact
            ["tc", "filter", "add", "dev", veth, "ingress", "prio", "1000", "u32", "match", "u32", "0", "0"],
            check=True,
            timeout=30,
        )
        foreign = [line for line in tc_lines("filter", "show", "dev", veth, "ingress") if "u32" in line]
        assert foreign

        top = EgressTop()
        top.wait_attached({ifindex})
        assert top.stop() == 0, top.stderr
        assert ifindex not in our_filters()
        assert [line for line in tc_lines("filter", "show", "dev", veth, "ingress") if "u32" in line] == (
            foreign
        )
        assert any(line.startswith("qdisc clsact ffff:") for line in tc_lines("qdisc", "show", "dev", veth))
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", veth, "clsact"], capture_output=True, timeout=30)


def egress_top_once(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "egress-top"), "--json", "-n", "1", "-i", "2", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_refresh(*args: str) -> list[dict[str, Any]]:
    """egress-top --json -n 1: the records of one 2-second interval."""
    result = egress_top_once(*args)
    assert result.returncode == 0, result.stderr
    return parse_records(result.stdout)


def test_container_filter_by_compose_service_and_by_id_prefix(lab: Lab, upstream) -> None:
    net = lab.network()
    service = f"api{RUN}"
    # Each sends 2 pings a second for at most 60 s: inside any 2-second interval.
    pinging = ["ping", "-i", "0.5", "-w", "60", UPSTREAM_V4]
    api = lab.container(
        "api",
        network=net,
        command=pinging,
        labels={"com.docker.compose.project": f"ett{RUN}", "com.docker.compose.service": service},
    )
    other = lab.container("other", network=net, command=pinging)
    for container in (api, other):
        wait_until(lambda c=container: veth_ifindexes(lab.pid(c)), timeout=5)

    everyone = {r["container_name"] for r in one_refresh()}
    assert {api.name, other.name} <= everyone  # control: without -c both show
    for ref in (service, api.id[:12]):
        records = one_refresh("-c", ref)
        assert records and {r["container_name"] for r in records} == {api.name}, ref
        assert (UPSTREAM_V4, "icmp") in {(r["dst"], r["proto"]) for r in records}, ref
        assert records[0]["compose_service"] == service
    unknown = egress_top_once("-c", f"ett-{RUN}-nobody")
    assert unknown.returncode == 2 and unknown.stdout == "", unknown
    assert len(unknown.stderr.strip().splitlines()) == 1 and f"ett-{RUN}-nobody" in unknown.stderr
