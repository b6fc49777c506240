"""egress-block for real: drops counted by what the upstream server actually received.

Every rule store here lives in a temporary EGRESS_TOP_STATE_DIR, and every name
the tests resolve comes from /etc/hosts entries they add (and remove).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lab import (
    UPSTREAM_V4,
    UPSTREAM_V4_BLOCKME,
    UPSTREAM_V4_OTHER,
    UPSTREAM_V6,
    UPSTREAM_V6_OTHER,
    Lab,
    wait_until,
)
from runner import BIN, EgressTop, run_cli, veth_ifindexes

from agent.datapath import PIN_DIR, our_filters
from agent.policy import RuleStore, winning_rule

HOSTS = Path("/etc/hosts")
TEST_NAME = "ett-upstream.test"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A private rule store, and afterwards: nothing of ours left, enforcement included."""
    monkeypatch.setenv("EGRESS_TOP_STATE_DIR", str(tmp_path / "state"))
    yield tmp_path / "state"
    run_cli("egress-agent", "cleanup")
    assert not our_filters() and not PIN_DIR.exists()


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli(*args)
    assert result.returncode == 0, f"{args}: {result.stderr}"
    return result


def delivered(lab: Lab, sink, container, dst: str, port: int, count: int = 5) -> int:  # type: ignore[no-untyped-def]
    """Datagrams of `count` sent that the upstream sink actually received."""
    before = sink.counts()[0]
    lab.send_udp(container, dst, port, count=count, size=32)
    time.sleep(0.3)  # the sink is on the same host: anything that passes arrives well within this
    return sink.counts()[0] - before


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

    def __init__(self, lab: Lab, container, dst: str, port: int):  # type: ignore[no-untyped-def]
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
        assert delivered(lab, sink_blocked, web, UPSTREAM_V4_BLOCKME, 5100) == 0
        assert not lab.tcp_connect(web, UPSTREAM_V4_BLOCKME, 5101, timeout=1.0)
        stream.send("after the block")  # the established connection is cut too
        time.sleep(0.5)
        assert tcp_sink.counts()[1] == len("before\n")
        # Same container, another upstream address; another container, the blocked address.
        assert delivered(lab, sink_blocked, web, UPSTREAM_V4, 5100) == 5
        assert delivered(lab, sink_blocked, other, UPSTREAM_V4_BLOCKME, 5100) == 5

        rules = [json.loads(line) for line in cli("egress-rules", "--json").stdout.splitlines()]
        assert len(rules) == 1 and rules[0]["container"] == web.name and rules[0]["hit_packets"] >= 5

        cli("egress-unblock", web.name, UPSTREAM_V4_BLOCKME)
        assert delivered(lab, sink_blocked, web, UPSTREAM_V4_BLOCKME, 5100) == 5
        assert lab.tcp_connect(web, UPSTREAM_V4_BLOCKME, 5101, timeout=2.0)
    finally:
        stream.close()
    # The last rule is gone and no process runs: nothing of ours stays.
    assert not our_filters() and not PIN_DIR.exists()


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
        assert (
            winning_rule(rules, dst, 17, port) is None or winning_rule(rules, dst, 17, port).action == "allow"
        ) == passing  # type: ignore[union-attr]

    # ICMP-only rule: ping to .2 fails, UDP to .2 still passes.
    cli("egress-block", web.name, UPSTREAM_V4_OTHER, "--proto", "icmp")
    assert web.exec_run(["ping", "-c", "1", "-W", "1", UPSTREAM_V4_OTHER]).exit_code != 0
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


@pytest.fixture
def hosts_entry():
    """Adds '<address> ett-upstream.test' lines to /etc/hosts; restores the file after."""
    original = HOSTS.read_bytes()

    def point_to(address: str) -> None:
        HOSTS.write_bytes(original + f"\n{address} {TEST_NAME}\n".encode())

    yield point_to
    HOSTS.write_bytes(original)


def test_host_name_rule_follows_the_name(lab: Lab, upstream, hosts_entry) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    sink = upstream.udp_sink(5301)
    hosts_entry(UPSTREAM_V4_BLOCKME)
    cli("egress-block", web.name, TEST_NAME)
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5301) == 0
    assert delivered(lab, sink, web, UPSTREAM_V4, 5301) == 5

    agent = subprocess.Popen(
        [str(BIN / "egress-agent"), "run", "--resolve-every", "0.5"], stderr=subprocess.PIPE, text=True
    )
    try:
        hosts_entry(UPSTREAM_V4)  # the name moves: the agent re-resolves and swaps the address
        wait_until(lambda: RuleStore().rules(web.name)[0].addresses == (f"{UPSTREAM_V4}/32",), timeout=10)
        wait_until(lambda: delivered(lab, sink, web, UPSTREAM_V4, 5301, count=1) == 0, timeout=5)
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5301) == 5
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0, agent.stderr.read() if agent.stderr else ""

    # A name that is no host name is refused before anything is written.
    bad = run_cli("egress-block", web.name, "no_such host!")
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_block_holds_across_restart_and_recreation(lab: Lab, upstream) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    sink = upstream.udp_sink(5401)
    agent = subprocess.Popen(
        [str(BIN / "egress-agent"), "run", "-i", "0.2"], stderr=subprocess.PIPE, text=True
    )
    try:
        cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
        old_veths = set(our_filters())
        web.restart(timeout=1)
        web.reload()
        # New veth, new ifindex: the agent attaches and tags it on the events.
        wait_until(lambda: set(our_filters()) - old_veths, timeout=5)
        time.sleep(0.5)
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5401) == 0
        assert delivered(lab, sink, web, UPSTREAM_V4, 5401) == 5

        name = web.name
        web.remove(force=True)
        again = lab.container("web", network=net, name=name)
        time.sleep(1.0)
        assert delivered(lab, sink, again, UPSTREAM_V4_BLOCKME, 5401) == 0
        assert delivered(lab, sink, again, UPSTREAM_V4, 5401) == 5
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=10) == 0, agent.stderr.read() if agent.stderr else ""


def test_block_outlives_egress_top_and_counters_survive(lab: Lab, upstream) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    idle = lab.container("idle", network=net)
    sink = upstream.udp_sink(5501)
    top = EgressTop()
    top.wait_attached(veth_ifindexes(lab.pid(web)))
    cli("egress-block", web.name, UPSTREAM_V4_BLOCKME)
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5501, count=4) == 0
    wait_until(lambda: any(r["verdict"] == "dropped" for r in top.flows_of(web.name).values()), timeout=5)
    assert top.stop() == 0, top.stderr
    dropped = [r for r in top.flows_of(web.name).values() if r["verdict"] == "dropped"]
    assert dropped and dropped[0]["dropped_packets"] == 4 and dropped[0]["rule_id"] == 1

    # No process runs: the block holds, and only the ruled container stays attached.
    web_veths = {i for i, _ in our_filters().items()}
    assert len(web_veths) == 1
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5501, count=3) == 0
    assert delivered(lab, sink, idle, UPSTREAM_V4_BLOCKME, 5501, count=3) == 3

    top = EgressTop()
    try:
        top.wait_attached(web_veths)
        hits = json.loads(cli("egress-rules", "--json").stdout)
        assert hits["hit_packets"] == 7  # counted across both runs and the gap between
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5501, count=2) == 0
    finally:
        assert top.stop() == 0, top.stderr

    removed = cli("egress-agent", "cleanup").stdout
    assert "filter on" in removed and "pins" in removed
    assert not our_filters() and not PIN_DIR.exists()
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5501, count=2) == 2


def test_parallel_blocks_all_land_and_bad_input_changes_nothing(lab: Lab, state_dir: Path) -> None:
    web = lab.container("web", network=lab.network())
    destinations = [f"198.18.113.{n}" for n in range(1, 11)]
    with ThreadPoolExecutor(max_workers=10) as pool:
        results = list(pool.map(lambda dst: run_cli("egress-block", web.name, dst), destinations))
    assert [r.returncode for r in results] == [0] * 10, [r.stderr for r in results]
    rules = [json.loads(line) for line in cli("egress-rules", "--json").stdout.splitlines()]
    assert sorted(r["dest"] for r in rules) == sorted(f"{d}/32" for d in destinations)

    store_file = state_dir / "rules.json"
    digest = hashlib.sha256(store_file.read_bytes()).hexdigest()
    bad_inputs = [
        (web.name, "198.18.113.0/33"),
        (web.name, "198.18.113.1/24"),  # host bits set
        (web.name, "198.18.113.5", "--port", "70000"),
        (web.name, "198.18.113.5", "--port", "http"),
        (web.name, "198.18.113.5", "--proto", "gre"),
        (web.name, "198.18.113.5", "--proto", "icmp", "--port", "53"),
        ("ett-no-such-container", "198.18.113.5"),
    ]
    for args in bad_inputs:
        result = run_cli("egress-block", *args)
        assert result.returncode == 2, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("egress-block: "), (args, result.stderr)
        assert hashlib.sha256(store_file.read_bytes()).hexdigest() == digest, args

    (state_dir / "rules.json").write_text("{not json")
    corrupt = run_cli("egress-block", web.name, "198.18.113.99")
    assert corrupt.returncode == 6 and "rules.json" in corrupt.stderr
    assert (state_dir / "rules.json").read_text() == "{not json"


def test_dry_run_lists_the_flows_it_would_cut_and_changes_nothing(
    lab: Lab, upstream, state_dir: Path
) -> None:
    net = lab.network()
    web = lab.container("web", network=net)
    sink = upstream.udp_sink(5601)
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab.pid(web)))
        port_blocked = lab.send_udp(web, UPSTREAM_V4_BLOCKME, 5601, count=2, size=10)
        lab.send_udp(web, UPSTREAM_V4, 5601, count=2, size=10)
        wait_until(lambda: len(top.flows_of(web.name)) == 2, timeout=5)
        result = cli("egress-block", web.name, "198.51.100.7", "--dry-run")
    finally:
        assert top.stop() == 0, top.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("dry run: 1 of 2 current flows")
    assert lines[1:] == [
        f"  cut: udp {lab.ip(web)}:{port_blocked} -> {UPSTREAM_V4_BLOCKME}:5601 (forwarded -> dropped)"
    ]
    assert not (state_dir / "rules.json").exists()
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5601) == 5
    assert os.environ["EGRESS_TOP_STATE_DIR"] == str(state_dir)
