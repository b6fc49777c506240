"""egress-block for real: drops counted by what the upstream server actually received.

Every rule store here lives in a temporary EGRESS_TOP_STATE_DIR, and every name
the tests resolve comes from /etc/hosts entries they add (and remove). A test that
leaves a rule in force checks it, then removes it: after each test, before any
cleanup, no filter, pin or clsact qdisc of ours may be left.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from docker.models.containers import Container
from lab import (
    PREFIX,
    RUN,
    UPSTREAM_V4,
    UPSTREAM_V4_BLOCKME,
    UPSTREAM_V4_OTHER,
    UPSTREAM_V6,
    UPSTREAM_V6_OTHER,
    Lab,
    Sink,
    wait_until,
)
from runner import Agent, EgressTop, nothing_left_behind, run_cli, veth_ifindexes

from agent.datapath import open_pinned_maps, our_filters
from agent.policy import RuleStore, lpm_entries, winning_rule

HOSTS = Path("/etc/hosts")
TEST_NAME = "ett-upstream.test"
UDP4_OVERHEAD = 28  # IPv4 + UDP headers: a datagram of S payload bytes is S + 28 IP bytes


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    """A private rule store. Needs `lab` so the leftover check runs while the containers
    (and their veths, which would take qdiscs with them) still exist."""
    yield from nothing_left_behind(tmp_path, monkeypatch)


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result


def rules_json() -> list[dict[str, Any]]:
    return [json.loads(line) for line in cli("egress-rules", "--json").stdout.splitlines()]


def flow_drops(veths: set[int], src_port: int, dst_port: int) -> int:
    """Packets of one UDP flow that the datapath dropped, from the pinned flow table."""
    maps = open_pinned_maps()
    if maps is None:
        return 0  # nothing of ours is loaded: nothing can drop
    try:
        read = maps.read_flows()
    finally:
        maps.close()
    keys = read.keys
    match = (
        np.isin(keys["ifindex"], list(veths))
        & (keys["proto"] == 17)
        & (keys["src_port"] == src_port)
        & (keys["dst_port"] == dst_port)
    )
    return int(read.stats["dropped_packets"][match].sum())


def delivered(lab: Lab, sink: Sink, container: Container, dst: str, port: int, count: int = 5) -> int:
    """Datagrams of `count` sent (from a fresh socket: its own flow) that the upstream sink
    received. Waits until every one is accounted for: received, or dropped by the datapath."""
    before = sink.counts()[0]
    veths = veth_ifindexes(lab.pid(container))
    src_port = lab.send_udp(container, dst, port, count=count, size=32)

    def accounted() -> tuple[int, int] | None:
        received, dropped = sink.counts()[0] - before, flow_drops(veths, src_port, port)
        return (received, dropped) if received + dropped >= count else None

    received, dropped = wait_until(accounted, timeout=5)
    assert received + dropped == count, f"{received} received + {dropped} dropped of {count} sent"
    return received


def pings(container: Container, address: str) -> bool:
    family = "-6" if ":" in address else "-4"
    return container.exec_run(["ping", family, "-c", "1", "-W", "1", address]).exit_code == 0


def store_digest(state_dir: Path) -> str | None:
    path = state_dir / "rules.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def wall_clock(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def policy_tagged(container: Container) -> set[int]:
    """The container's veths that the endpoint map marks as enforcing its rules."""
    maps = open_pinned_maps()
    if maps is None:
        return set()
    try:
        return maps.policy_endpoints() & veth_ifindexes(Lab.pid(container))
    finally:
        maps.close()


class StreamFromContainer:
    """One TCP connection held open from inside a container; lines on stdin become sends."""

    SCRIPT = (
        "import socket,sys\n"
        "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=3)\n"
        "print('connected',flush=True)\n"
        "for line in sys.stdin:\n"
        "    try: s.send(line.encode())\n"
        "    except OSError as e: print('error',e,flush=True); break\n"
    )

    def __init__(self, lab: Lab, container: Container, dst: str, port: int):
        self.proc = subprocess.Popen(
            [
                "timeout",
                "60",
                "nsenter",
                f"--net=/proc/{lab.pid(container)}/ns/net",
                sys.executable,
                "-c",
                self.SCRIPT,
                dst,
                str(port),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "connected"

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def test_block_address_cuts_udp_and_tcp_only_for_that_container_and_destination(lab: Lab, upstream) -> None:
    net = lab.network()
    web, other = lab.container("web", network=net), lab.container("other", network=net)
    sink_blocked = upstream.udp_sink(5100)
    tcp_sink = upstream.tcp_sink(5101)
    stream = StreamFromContainer(lab, web, UPSTREAM_V4_BLOCKME, 5101)
    try:
        stream.send("before")
        wait_until(lambda: tcp_sink.counts()[1] == len("before\n"), timeout=3)
        assert delivered(lab, sink_blocked, web, UPSTREAM_V4_BLOCKME, 5100) == 5

        cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
        # No waiting: the rule is in force when the command returns.
        sent_from = time.time()
        assert delivered(lab, sink_blocked, web, UPSTREAM_V4_BLOCKME, 5100) == 0
        sent_until = time.time()
        [rule] = rules_json()
        assert rule["container"] == web.name and rule["dest"] == f"{UPSTREAM_V4_BLOCKME}/32"
        assert (rule["hit_packets"], rule["hit_bytes"]) == (5, 5 * (32 + UDP4_OVERHEAD))
        assert sent_from - 0.1 <= wall_clock(rule["last_hit"]) <= sent_until + 0.1, rule["last_hit"]

        # Same container, another upstream address; another container, the blocked address.
        assert delivered(lab, sink_blocked, web, UPSTREAM_V4, 5100) == 5
        assert delivered(lab, sink_blocked, other, UPSTREAM_V4_BLOCKME, 5100) == 5
        assert not lab.tcp_connect(web, UPSTREAM_V4_BLOCKME, 5101, timeout=1.0)
        assert tcp_sink.counts()[0] == 1  # the stream's connection only
        # The established connection is cut too: its segment meets the rule and goes no further.
        hits_before = rules_json()[0]["hit_packets"]
        stream.send("after the block")
        wait_until(lambda: rules_json()[0]["hit_packets"] > hits_before, timeout=5)
        assert tcp_sink.counts()[1] == len("before\n")

        cli("egress-unblock", web.name, UPSTREAM_V4_BLOCKME)
        # TCP retransmits the cut segment: it arrives now.
        wait_until(lambda: tcp_sink.counts()[1] == len("before\nafter the block\n"), timeout=10)
        assert delivered(lab, sink_blocked, web, UPSTREAM_V4_BLOCKME, 5100) == 5
        assert lab.tcp_connect(web, UPSTREAM_V4_BLOCKME, 5101, timeout=2.0)
    finally:
        stream.close()


def test_cidr_port_proto_ipv6_and_allow_exceptions(lab: Lab, upstream) -> None:
    net = lab.network(ipv6=True)
    web = lab.container("web", network=net)
    sinks = {port: upstream.udp_sink(port) for port in (5201, 5202)}
    sinks6 = {port: upstream.udp_sink(port, address="::") for port in (5203,)}

    def passes(dst: str, port: int) -> bool:
        sink = (sinks | sinks6)[port]
        return delivered(lab, sink, web, dst, port, count=3) == 3

    cli("egress-block", web.name, "198.51.100.0/24")
    cli("egress-allow", web.name, UPSTREAM_V4_OTHER)
    cli("egress-block", web.name, UPSTREAM_V4_OTHER, "--proto", "udp", "--port", "5202")
    cli("egress-block", web.name, UPSTREAM_V6)
    expected = {
        (UPSTREAM_V4, 5201): False,  # inside the blocked /24
        (UPSTREAM_V4_OTHER, 5201): True,  # the allow for .2 is more specific than the /24
        (UPSTREAM_V4_OTHER, 5202): False,  # at the same /32, the port rule beats the allow
        (UPSTREAM_V6, 5203): False,
        (UPSTREAM_V6_OTHER, 5203): True,
    }
    rules = RuleStore().rules(web.name)
    for (dst, port), passing in expected.items():
        assert passes(dst, port) == passing, (dst, port)
        # The datapath and the Python statement of the semantics agree.
        winner = winning_rule(rules, dst, 17, port)
        assert (winner is None or winner.action == "allow") == passing, (dst, port)

    # ICMP-only rule: ping to .2 worked (the allow), fails now; UDP to .2 still passes.
    assert pings(web, UPSTREAM_V4_OTHER)
    cli("egress-block", web.name, UPSTREAM_V4_OTHER, "--proto", "icmp")
    assert not pings(web, UPSTREAM_V4_OTHER)
    assert passes(UPSTREAM_V4_OTHER, 5201)

    # Allow-list: block everything, allow one port on one address.
    cli("egress-unblock", web.name, "--all")
    cli("egress-block", web.name, "0.0.0.0/0")
    cli("egress-block", web.name, "::/0")
    cli("egress-allow", web.name, UPSTREAM_V4, "--proto", "udp", "--port", "5201")
    assert passes(UPSTREAM_V4, 5201)
    assert not passes(UPSTREAM_V4, 5202)
    assert not passes(UPSTREAM_V4_OTHER, 5201)
    assert not passes(UPSTREAM_V6_OTHER, 5203)
    cli("egress-unblock", web.name, "--all")


def test_icmp_rule_towards_ipv6_cuts_ping6_only(lab: Lab, upstream) -> None:
    web = lab.container("web", network=lab.network(ipv6=True))
    sink6 = upstream.udp_sink(5251, address="::")
    wait_until(lambda: pings(web, UPSTREAM_V6), timeout=10)  # control (and the address is past DAD)
    cli("egress-block", web.name, UPSTREAM_V6, "--proto", "icmp")
    assert not pings(web, UPSTREAM_V6)
    [rule] = rules_json()
    # the one echo request, as ICMPv6 (proto 58): 40 IPv6 + 8 ICMPv6 + ping's 56 data bytes
    assert (rule["hit_packets"], rule["hit_bytes"]) == (1, 40 + 8 + 56)
    assert pings(web, UPSTREAM_V6_OTHER)  # another address
    assert pings(web, UPSTREAM_V4)  # ICMP over IPv4
    assert delivered(lab, sink6, web, UPSTREAM_V6, 5251) == 5  # not ICMP
    cli("egress-unblock", web.name, UPSTREAM_V6, "--proto", "icmp")
    assert pings(web, UPSTREAM_V6)


def test_port_rule_with_any_protocol_cuts_tcp_and_udp_to_that_port(lab: Lab, upstream) -> None:
    web = lab.container("web", network=lab.network())
    ports = (5261, 5262)
    udp = {port: upstream.udp_sink(port) for port in ports}
    tcp = {port: upstream.tcp_sink(port) for port in ports}
    for port in ports:  # control: both protocols reach both ports
        assert delivered(lab, udp[port], web, UPSTREAM_V4, port) == 5
        assert lab.tcp_connect(web, UPSTREAM_V4, port, timeout=2.0)
        assert tcp[port].counts()[0] == 1

    cli("egress-block", web.name, UPSTREAM_V4, "--port", "5261")  # --proto any is the default
    assert [r["proto"] for r in rules_json()] == ["any"]
    assert delivered(lab, udp[5261], web, UPSTREAM_V4, 5261) == 0
    assert not lab.tcp_connect(web, UPSTREAM_V4, 5261, timeout=1.0)
    assert tcp[5261].counts() == (1, 0)  # the control's connection, and no new one
    assert delivered(lab, udp[5262], web, UPSTREAM_V4, 5262) == 5
    assert lab.tcp_connect(web, UPSTREAM_V4, 5262, timeout=2.0)
    assert tcp[5262].counts()[0] == 2
    cli("egress-unblock", web.name, UPSTREAM_V4, "--port", "5261")


@pytest.fixture
def hosts_entry():
    """Adds '<address> ett-upstream.test' lines to /etc/hosts; restores the file after."""
    original = HOSTS.read_bytes()

    def point_to(address: str) -> None:
        HOSTS.write_bytes(original + f"\n{address} {TEST_NAME}\n".encode())

    yield point_to
    HOSTS.write_bytes(original)


def test_host_name_rule_follows_the_name(lab: Lab, upstream, hosts_entry, state_dir: Path) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    sink = upstream.udp_sink(5301)
    hosts_entry(UPSTREAM_V4_BLOCKME)
    cli("egress-block", web.name, TEST_NAME)
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5301) == 0
    assert delivered(lab, sink, web, UPSTREAM_V4, 5301) == 5

    agent = Agent("--resolve-every", "0.5")
    try:
        agent.wait_ready()
        hosts_entry(UPSTREAM_V4)  # the name moves: the agent re-resolves and swaps the address
        wait_until(lambda: RuleStore().rules(web.name)[0].addresses == (f"{UPSTREAM_V4}/32",), timeout=10)
        wait_until(lambda: delivered(lab, sink, web, UPSTREAM_V4, 5301, count=1) == 0, timeout=5)
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5301) == 5
    finally:
        assert agent.stop() == 0, agent.stderr_lines

    # A name that is no host name is refused before anything is written.
    digest = store_digest(state_dir)
    bad = run_cli("egress-block", web.name, "no_such host!")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1, bad.stderr
    assert store_digest(state_dir) == digest
    cli("egress-unblock", web.name, TEST_NAME)


def test_block_holds_across_restart_and_recreation_and_after_the_agent_stops(lab: Lab, upstream) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    sink = upstream.udp_sink(5401)
    agent = Agent("-i", "0.2")
    try:
        agent.wait_ready()
        cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
        old_veths = veth_ifindexes(lab.pid(web))
        web.restart(timeout=1)
        # New veth, new ifindex: the agent attaches to it and tags it with the rules.
        wait_until(lambda: policy_tagged(web) - old_veths, timeout=5)
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5401) == 0
        assert delivered(lab, sink, web, UPSTREAM_V4, 5401) == 5

        name = web.name
        web.remove(force=True)
        again = lab.container("web", network=net, name=name)
        wait_until(lambda: policy_tagged(again), timeout=5)
        assert delivered(lab, sink, again, UPSTREAM_V4_BLOCKME, 5401) == 0
        assert delivered(lab, sink, again, UPSTREAM_V4, 5401) == 5
    finally:
        assert agent.stop() == 0, agent.stderr_lines

    # SIGTERM leaves rules in force: still enforced with no process running.
    assert delivered(lab, sink, again, UPSTREAM_V4_BLOCKME, 5401) == 0
    assert delivered(lab, sink, again, UPSTREAM_V4, 5401) == 5
    assert set(our_filters()) == veth_ifindexes(lab.pid(again))
    cli("egress-unblock", again.name, UPSTREAM_V4_BLOCKME)
    assert delivered(lab, sink, again, UPSTREAM_V4_BLOCKME, 5401) == 5


def test_pending_rule_applies_when_the_container_starts(lab: Lab, upstream) -> None:
    net = lab.network()
    name = f"{PREFIX}-{RUN}-late"  # lab.container(name=...) below makes it the lab's to remove
    sink = upstream.udp_sink(5451)
    added = cli("egress-block", name, UPSTREAM_V4_BLOCKME, "--pending").stdout
    assert (
        added
        == f"added rule 1: {name} block {UPSTREAM_V4_BLOCKME}/32 any (pending: applies when the container starts)\n"
    )
    assert [(r["container"], r["pending"]) for r in rules_json()] == [(name, True)]
    unknown = run_cli("egress-block", name, UPSTREAM_V4_BLOCKME)  # without --pending: refused
    assert unknown.returncode == 2 and len(unknown.stderr.strip().splitlines()) == 1, unknown.stderr

    agent = Agent("-i", "0.2")
    try:
        agent.wait_ready()
        late = lab.container("late", network=net, name=name)
        wait_until(lambda: policy_tagged(late), timeout=5)
        assert delivered(lab, sink, late, UPSTREAM_V4_BLOCKME, 5451) == 0
        assert delivered(lab, sink, late, UPSTREAM_V4, 5451) == 5
        wait_until(lambda: [r["pending"] for r in rules_json()] == [False], timeout=5)
    finally:
        assert agent.stop() == 0, agent.stderr_lines
    cli("egress-unblock", name, "--all")
    assert delivered(lab, sink, late, UPSTREAM_V4_BLOCKME, 5451) == 5


def test_block_outlives_egress_top_and_counters_survive(lab: Lab, upstream, state_dir: Path) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    idle = lab.container("idle", network=net)
    sink = upstream.udp_sink(5501)
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab.pid(web)))
        cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5501, count=4) == 0
        wait_until(lambda: any(r["verdict"] == "dropped" for r in top.flows_of(web.name).values()), timeout=5)
    finally:
        assert top.stop() == 0, top.stderr
    [dropped] = [r for r in top.flows_of(web.name).values() if r["verdict"] == "dropped"]
    # `packets` counts every packet the container sent, the dropped ones included.
    assert (dropped["packets"], dropped["dropped_packets"], dropped["rule_id"]) == (4, 4, 1)
    assert dropped["bytes"] == dropped["dropped_bytes"] == 4 * (32 + UDP4_OVERHEAD)

    # No process runs: the block holds, and only the ruled container stays attached.
    web_veths = set(our_filters())
    assert web_veths == veth_ifindexes(lab.pid(web))
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5501, count=3) == 0
    assert delivered(lab, sink, idle, UPSTREAM_V4_BLOCKME, 5501, count=3) == 3

    top = EgressTop()
    try:
        top.wait_attached(web_veths)
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5501, count=2) == 0
        [hits] = rules_json()
        # counted across both runs and the gap between
        assert (hits["hit_packets"], hits["hit_bytes"]) == (9, 9 * (32 + UDP4_OVERHEAD))
    finally:
        assert top.stop() == 0, top.stderr

    digest = store_digest(state_dir)
    removed = cli("egress-agent", "cleanup").stdout
    assert "filter on" in removed and "pins" in removed
    assert not our_filters() and not open_pinned_maps()
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5501, count=2) == 2
    # cleanup removes enforcement, never the rule store
    assert store_digest(state_dir) == digest
    assert [(r["container"], r["dest"]) for r in rules_json()] == [(web.name, f"{UPSTREAM_V4_BLOCKME}/32")]


def kernel_policy() -> dict[bytes, bytes]:
    """The pinned policy_lpm trie as it is in the kernel: key bytes -> value bytes."""
    maps = open_pinned_maps()
    assert maps is not None, "no pinned maps"
    try:
        return dict(maps.policy.items())
    finally:
        maps.close()


def test_parallel_blocks_all_land_in_the_kernel_and_bad_input_changes_nothing(
    lab: Lab, state_dir: Path
) -> None:
    web = lab.container("web", network=lab.network())
    destinations = [f"198.18.113.{n}" for n in range(1, 11)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda dst: run_cli("egress-block", web.name, dst), destinations))
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    assert sorted(r["dest"] for r in rules_json()) == sorted(f"{d}/32" for d in destinations)
    contents = RuleStore().load()
    compiled = lpm_entries(contents.rules, contents.slots)
    assert kernel_policy() == {entry.key_bytes(): entry.value_bytes() for entry in compiled}
    assert sorted(entry.rule_id for entry in compiled) == list(range(1, 11))

    digest = store_digest(state_dir)
    bad_inputs = [
        ("egress-block", web.name, "198.18.113.0/33"),
        ("egress-block", web.name, "198.18.113.1/24"),  # host bits set
        ("egress-block", web.name, "198.18.113.5", "--port", "70000"),
        ("egress-block", web.name, "198.18.113.5", "--port", "http"),
        ("egress-block", web.name, "198.18.113.5", "--proto", "gre"),
        ("egress-block", web.name, "198.18.113.5", "--proto", "icmp", "--port", "53"),
        ("egress-block", "ett-no-such-container", "198.18.113.5"),
        ("egress-unblock", web.name, "198.18.113.99"),  # no such rule
        ("egress-unblock", web.name, "198.18.113.1", "--proto", "udp"),  # the rule is for any protocol
    ]
    for args in bad_inputs:
        result = run_cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"{args[0]}: "), (args, result.stderr)
        assert store_digest(state_dir) == digest, args
    assert kernel_policy() == {entry.key_bytes(): entry.value_bytes() for entry in compiled}
    unknown = run_cli("egress-unblock", web.name, "198.18.113.99")
    assert (
        f"no rule for {web.name} matches 198.18.113.99/32 any; {web.name} has: block 198.18."
        in unknown.stderr
    )

    store_file = state_dir / "rules.json"
    good = store_file.read_bytes()
    store_file.unlink()
    for make_unusable in (
        lambda: store_file.write_text("{not json"),
        lambda: store_file.write_bytes(b"\xff\xfe\x00 not UTF-8"),
        store_file.mkdir,  # unreadable as a file
    ):
        make_unusable()
        unusable = store_file.read_bytes() if store_file.is_file() else None
        for args in (("egress-block", web.name, "198.18.113.99"), ("egress-rules",)):
            refused = run_cli(*args)
            assert refused.returncode == 6, (args, refused.stderr)
            lines = refused.stderr.strip().splitlines()
            assert len(lines) == 1 and "rules.json" in lines[0], (args, refused.stderr)
        # left as it is
        assert store_file.exists() and (store_file.read_bytes() if store_file.is_file() else None) == unusable
        store_file.rmdir() if store_file.is_dir() else store_file.unlink()
    store_file.write_bytes(good)
    cli("egress-unblock", web.name, "--all")


def test_dry_run_lists_the_flows_it_would_cut_or_let_through_and_changes_nothing(
    lab: Lab, upstream, state_dir: Path
) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    sink = upstream.udp_sink(5601)
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab.pid(web)))
        port_blocked = lab.send_udp(web, UPSTREAM_V4_BLOCKME, 5601, count=2, size=10)
        port_other = lab.send_udp(web, UPSTREAM_V4, 5601, count=2, size=10)
        wait_until(lambda: len(top.flows_of(web.name)) == 2, timeout=5)
        cut = cli("egress-block", web.name, UPSTREAM_V4_BLOCKME, "--dry-run").stdout
        assert store_digest(state_dir) is None
        cli("egress-block", web.name, "198.51.100.0/24")
        let_through = cli("egress-allow", web.name, UPSTREAM_V4, "--dry-run").stdout
        after_block = store_digest(state_dir)
    finally:
        assert top.stop() == 0, top.stderr
    flow = f"udp {lab.ip(web)}:{port_blocked} -> {UPSTREAM_V4_BLOCKME}:5601"
    assert cut.splitlines() == [
        f"dry run: 1 of 2 current flows of {web.name} would change; nothing was changed",
        f"  cut: {flow} (forwarded -> dropped)",
    ]
    assert let_through.splitlines() == [
        f"dry run: 1 of 2 current flows of {web.name} would change; nothing was changed",
        f"  let through: udp {lab.ip(web)}:{port_other} -> {UPSTREAM_V4}:5601 (dropped -> forwarded)",
    ]
    assert store_digest(state_dir) == after_block
    assert [r["action"] for r in rules_json()] == ["block"]
    assert delivered(lab, sink, web, UPSTREAM_V4, 5601) == 0  # the allow was not added
    cli("egress-unblock", web.name, "--all")
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5601) == 5
