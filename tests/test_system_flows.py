"""Foundation, for real: dockerd, BPF on veths, network namespaces, exact counts.

Traffic goes only to the lab's own containers and its `upstream` netns.
"""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import (
    UPSTREAM_V4,
    UPSTREAM_V4_OTHER,
    UPSTREAM_V6,
    Lab,
    network_of_driver,
    wait_until,
)
from runner import EgressTop, nothing_left_behind, parse_records, run_cli
from runner import veth_ifindexes as container_veths

from agent.datapath import our_filters
from agent.datapath.headers import ensure_kernel_headers, find_installed_headers

IPV4_UDP_OVERHEAD = 28  # IPv4 header 20 + UDP header 8: our byte counts are IP bytes
IPV6_UDP_OVERHEAD = 48


def veth_ifindexes(lab: Lab, container) -> set[int]:  # type: ignore[no-untyped-def]
    return container_veths(lab.pid(container))


def udp_flow_seen(lab: Lab, owner, sender, src: str, dst: str, port: int, count: int, size: int):  # type: ignore[no-untyped-def]
    """Run egress-top while `sender` sends UDP; stop it once the flow shows under `owner`.
    Returns the stopped EgressTop and the flow's 5-tuple key."""
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab, owner))
        src_port = lab.send_udp(sender, dst, port, count=count, size=size)
        key = (src, src_port, dst, port, "udp")
        wait_until(lambda: key in top.flows_of(owner.name), timeout=5)
    finally:
        assert top.stop() == 0, top.stderr
    return top, key


@pytest.fixture(autouse=True)
def nothing_of_ours_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


def test_udp_to_upstream_is_counted_exactly_on_the_senders_flow(lab: Lab, upstream) -> None:
    count, size, port = 25, 200, 5001
    net = lab.network()
    sender = lab.container("sender", network=net)
    idle = lab.container("idle", network=net)
    sink = upstream.udp_sink(port)
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab, sender) | veth_ifindexes(lab, idle))
        src_port = lab.send_udp(sender, UPSTREAM_V4, port, count=count, size=size)
        sink.wait_for(count, timeout=5)
        flow_key = (lab.ip(sender), src_port, UPSTREAM_V4, port, "udp")
        wait_until(lambda: top.flows_of(sender.name).get(flow_key, {}).get("packets") == count, timeout=5)
    finally:
        assert top.stop() == 0, top.stderr
    assert sink.counts() == (count, count * size)
    flows = top.flows_of(sender.name)
    record = flows[flow_key]
    assert record["packets"] == count
    assert record["bytes"] == count * (size + IPV4_UDP_OVERHEAD)
    assert record["dst_kind"] == "external"
    assert record["family"] == "ipv4" and record["network"] == net.name
    # Direction: the sender's only flow is the one it sent; the upstream is never a source.
    assert list(flows) == [flow_key]
    assert all(r["src"] != UPSTREAM_V4 for r in top.records)
    assert top.flows_of(idle.name) == {}


def test_container_to_container_flows_belong_to_the_sender(lab: Lab) -> None:
    net = lab.network()
    alice = lab.container("alice", network=net)
    bob = lab.container("bob", network=net)
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab, alice) | veth_ifindexes(lab, bob))
        alice_port = lab.send_udp(alice, lab.ip(bob), 6001, count=7, size=50)
        bob_port = lab.send_udp(bob, lab.ip(alice), 6002, count=11, size=80)
        alice_key = (lab.ip(alice), alice_port, lab.ip(bob), 6001, "udp")
        bob_key = (lab.ip(bob), bob_port, lab.ip(alice), 6002, "udp")
        wait_until(
            lambda: alice_key in top.flows_of(alice.name) and bob_key in top.flows_of(bob.name), timeout=5
        )
    finally:
        assert top.stop() == 0, top.stderr
    alice_flows, bob_flows = top.flows_of(alice.name), top.flows_of(bob.name)
    assert alice_flows[alice_key]["packets"] == 7
    assert alice_flows[alice_key]["bytes"] == 7 * (50 + IPV4_UDP_OVERHEAD)
    assert (alice_flows[alice_key]["dst_kind"], alice_flows[alice_key]["dst_name"]) == ("container", bob.name)
    assert bob_flows[bob_key]["packets"] == 11
    assert (bob_flows[bob_key]["dst_kind"], bob_flows[bob_key]["dst_name"]) == ("container", alice.name)
    # Each container only ever shows traffic it sent (ICMP port-unreachable replies included).
    assert all(r["src"] == lab.ip(alice) for r in alice_flows.values())
    assert all(r["src"] == lab.ip(bob) for r in bob_flows.values())


def test_container_on_two_networks_counts_each_network(lab: Lab) -> None:
    front, back = lab.network(), lab.network()
    multi = lab.container("multi", network=front, extra_networks=[back])
    peer_front = lab.container("pfront", network=front)
    peer_back = lab.container("pback", network=back)
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab, multi))
        assert len(veth_ifindexes(lab, multi)) == 2
        front_port = lab.send_udp(multi, lab.ip(peer_front, front.name), 7001, count=5, size=10)
        back_port = lab.send_udp(multi, lab.ip(peer_back, back.name), 7002, count=9, size=10)
        wait_until(lambda: len(top.flows_of(multi.name)) >= 2, timeout=5)
    finally:
        assert top.stop() == 0, top.stderr
    flows = top.flows_of(multi.name)
    front_flow = flows[(lab.ip(multi, front.name), front_port, lab.ip(peer_front, front.name), 7001, "udp")]
    back_flow = flows[(lab.ip(multi, back.name), back_port, lab.ip(peer_back, back.name), 7002, "udp")]
    assert (front_flow["network"], front_flow["packets"]) == (front.name, 5)
    assert (back_flow["network"], back_flow["packets"]) == (back.name, 9)
    assert front_flow["veth"] != back_flow["veth"]


def test_container_started_while_running_is_counted_within_a_second(lab: Lab, upstream) -> None:
    pings = 10
    net = lab.network()
    # pings all along, so records keep coming: egress-top is seen refreshing before and after
    canary = lab.container(
        "canary",
        network=net,
        command=["sh", "-c", f"for i in $(seq 1 600); do ping -c1 -W1 {UPSTREAM_V4_OTHER}; sleep 0.1; done"],
    )
    top = EgressTop(interval=0.2)
    try:
        # egress-top is up (load, first inventory, attached, reporting) before the container exists
        top.wait_attached(veth_ifindexes(lab, canary))
        top.wait_for(lambda r: r["container_name"] == canary.name, timeout=5)
        late = lab.container(
            "late",
            network=net,
            command=[
                "sh",
                "-c",
                f"for i in $(seq 1 {pings}); do ping -c1 -W1 {UPSTREAM_V4}; sleep 0.1; done",
            ],
            start=False,
        )
        started = time.time()
        late.start()
        ifindexes = veth_ifindexes(lab, late)  # now: the container exits after its pings
        record = top.wait_for(lambda r: r["container_name"] == late.name, timeout=5)
        seen_at = top.arrival[top.records.index(record)]
        assert seen_at - started < 1.0 + 0.2, f"first record {seen_at - started:.2f}s after start"
        key = (lab.ip(late), None, UPSTREAM_V4, None, "icmp")
        assert record["dst"] == UPSTREAM_V4 and record["proto"] == "icmp" and record["icmp_type"] == 8
        # every echo request the container sent, the first one included (attached before it ran)
        wait_until(lambda: top.flows_of(late.name).get(key, {}).get("packets") == pings, timeout=10)

        late.stop(timeout=1)
        wait_until(lambda: not ifindexes & set(our_filters()), timeout=5)
        vanished = time.time()
        # two more refreshes after the veth vanished
        wait_until(lambda: len([t for t in top.arrival if t > vanished]) >= 2, timeout=5)
        assert top.proc.poll() is None, "egress-top died when the container stopped"
    finally:
        assert top.stop() == 0, top.stderr
    assert list(top.flows_of(late.name)) == [key]
    assert top.flows_of(late.name)[key]["packets"] == pings
    assert top.stderr == ""


def test_ipv6_flow_is_counted_with_its_addresses(lab: Lab, upstream) -> None:
    sender = lab.container("v6", network=lab.network(ipv6=True))
    top, key = udp_flow_seen(
        lab, owner=sender, sender=sender, src=lab.ip6(sender), dst=UPSTREAM_V6, port=5006, count=6, size=100
    )
    record = top.flows_of(sender.name)[key]
    assert (record["family"], record["packets"]) == ("ipv6", 6)
    assert record["bytes"] == 6 * (100 + IPV6_UDP_OVERHEAD)


def test_containers_without_a_veth_are_listed_as_not_observable_with_the_reason(
    macvlan_parent: str, lab: Lab, upstream
) -> None:
    """host, none, macvlan and a netns sharer (ipvlan: this kernel has no ipvlan module, and
    the inventory treats it as it treats macvlan, by the network's driver)."""
    net = lab.network()
    owner = lab.container("owner", network=net)
    sharer = lab.container("sharer", network_mode=f"container:{owner.id}")
    on_host = lab.container("onhost", network_mode="host")
    isolated = lab.container("none", network_mode="none")
    macvlan = network_of_driver(lab, "macvlan", macvlan_parent, "198.18.10.0/24")
    on_macvlan = lab.container("onmacvlan", network=macvlan)
    top, key = udp_flow_seen(
        lab, owner=owner, sender=sharer, src=lab.ip(owner), dst=UPSTREAM_V4, port=5007, count=3, size=10
    )
    assert top.flows_of(owner.name)[key]["packets"] == 3
    assert top.flows_of(sharer.name) == {}

    plain = run_cli("egress-top", "-n", "1", "-i", "0.2")
    assert (plain.returncode, plain.stderr) == (0, ""), plain.stderr
    lines = plain.stdout.splitlines()
    assert "containers 1 observed, 4 not" in lines[0], lines[0]
    reasons = {
        sharer.name: f"shares the network namespace of {owner.name} (counted there)",
        on_host.name: "host network: its traffic crosses no veth",
        isolated.name: "network none: no interface but loopback",
        on_macvlan.name: f"macvlan network {macvlan.name}: no host-side veth to attach to",
    }
    not_observed = lines[lines.index("NOT OBSERVED") + 1 :]
    assert sorted(not_observed) == sorted(f"{name:<24} {reason}" for name, reason in reasons.items())


@pytest.mark.parametrize("how", ["count", "sigterm", "sigint"])
def test_exit_leaves_no_filter_or_qdisc(lab: Lab, how: str) -> None:
    net = lab.network()
    container = lab.container("exit", network=net)
    ifindexes = veth_ifindexes(lab, container)
    if how == "count":
        # records carry the veth they were counted on: proof that -n 2 attached to it
        pinger = lab.container(
            "exitping",
            network=net,
            command=["sh", "-c", f"for i in $(seq 1 300); do ping -c1 -W1 {UPSTREAM_V4}; sleep 0.05; done"],
        )
        ifindexes |= veth_ifindexes(lab, pinger)
        result = run_cli("egress-top", "--json", "-n", "2", "-i", "0.3")
        assert result.returncode == 0, result.stderr
        records = parse_records(result.stdout)
        assert {r["ifindex"] for r in records if r["container_name"] == pinger.name} == veth_ifindexes(
            lab, pinger
        ), result.stdout
    else:
        top = EgressTop()
        top.wait_attached(ifindexes)
        assert top.stop(signal.SIGTERM if how == "sigterm" else signal.SIGINT) == 0, top.stderr
    for ifindex in ifindexes:
        qdiscs = subprocess.run(
            ["tc", "qdisc", "show", "dev", _ifname(ifindex)], capture_output=True, text=True
        )
        assert "clsact" not in qdiscs.stdout


def _ifname(ifindex: int) -> str:
    return socket.if_indextoname(ifindex)


# --- errors: one line, its exit code, nothing left behind ------------------------------


def _one_line_error(result: subprocess.CompletedProcess[str], exit_code: int, *words: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert result.returncode == exit_code, result.stderr
    assert len(lines) == 1 and lines[0].startswith("egress-top: "), result.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert result.stdout == ""


def test_error_not_root() -> None:
    nobody = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all")
    _one_line_error(run_cli("egress-top", "--json", "-n", "1", prefix=nobody), 3, "root", "sudo")


def test_error_root_without_cap_bpf() -> None:
    no_bpf = ("setpriv", "--bounding-set=-bpf,-sys_admin", "--inh-caps=-bpf,-sys_admin")
    result = run_cli("egress-top", "--json", "-n", "1", prefix=no_bpf)
    _one_line_error(result, 3, "CAP_BPF")


def test_error_docker_unreachable() -> None:
    result = run_cli("egress-top", "--json", "-n", "1", env={"DOCKER_HOST": "unix:///run/ett-no-such.sock"})
    _one_line_error(result, 4, "unix:///run/ett-no-such.sock", "dockerd")


def test_error_unknown_container() -> None:
    result = run_cli("egress-top", "--json", "-n", "1", "--container", "ett-no-such-container")
    _one_line_error(result, 2, "ett-no-such-container")


def _in_private_mounts(setup: str) -> tuple[str, ...]:
    """A command prefix: run in a private mount namespace after `setup` (shell)."""
    return ("unshare", "-m", "--propagation", "private", "sh", "-c", f'{setup} && exec "$@"', "sh")


def test_error_no_kernel_headers(tmp_path: Path) -> None:
    no_headers = _in_private_mounts("mount -t tmpfs none /lib/modules && mount -t tmpfs none /usr/src")
    empty_cache = {"EGRESS_TOP_PROGRAM_CACHE": str(tmp_path / "program-cache")}  # else it needs no compile
    refused = run_cli("egress-top", "--json", "-n", "1", prefix=no_headers, env=empty_cache)
    _one_line_error(refused, 5, "linux-headers-amd64")


def test_error_bpffs_not_mountable() -> None:
    # /sys/fs read-only and empty: there is nowhere to mount bpffs
    no_bpffs = _in_private_mounts(
        "{ umount /sys/fs/bpf 2>/dev/null; true; } && mount -t tmpfs -o ro none /sys/fs"
    )
    _one_line_error(run_cli("egress-top", "--json", "-n", "1", prefix=no_bpffs), 5, "bpffs")


def test_error_program_refused_shows_log_with_verbose() -> None:
    too_big = str(2**31)
    quiet = run_cli("egress-top", "--json", "-n", "1", "--flow-table-size", too_big)
    _one_line_error(quiet, 5, "refused", "--verbose")
    verbose = run_cli("egress-top", "--json", "-n", "1", "-v", "--flow-table-size", too_big)
    assert verbose.returncode == 5
    assert len(verbose.stderr.strip().splitlines()) > 1  # the loader's own lines follow


def test_headers_fallback_logs_one_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Real header discovery against Debian's split tree, in a throwaway modules root."""
    modules = tmp_path / "modules"
    tree = find_installed_headers()
    assert tree is not None, "no linux-headers-* under /usr/src: run 'sudo make setup'"
    with caplog.at_level(logging.DEBUG, logger="agent.datapath.headers"):
        ensure_kernel_headers(release="9.9.9-test", modules_root=modules)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (
            logging.WARNING,
            f"no headers packaged for kernel 9.9.9-test: using {tree.build.name} (UAPI headers suffice)",
        )
    ]
    build = modules / "9.9.9-test" / "build"
    assert build.is_symlink() and build.resolve() == tree.build.resolve() and (build / "Makefile").exists()
    assert (modules / "9.9.9-test" / "source" / "include" / "linux" / "kconfig.h").exists()
