"""A container cannot walk around its own rules with packets the parser does not fully
understand (issue 10, item 13), on a real container, datapath and receiver.

From inside the container's netns, the host's python3 crafts IPv6 packets to the
upstream netns: UDP behind 0, 6, 7, 8 and 12 destination-options headers, a first
fragment that does not hold the UDP header, a UDP header cut to 2 bytes, and an IPv6
header cut to 20 bytes. Control: with no rule the upstream receiver accepts every
datagram that Linux can deliver (the extension-header ones, counted exactly). With
`egress-block C UPSTREAM_V6 --port 9444 --proto udp` it receives none: the parsed
ones are dropped by the rule, the rest fail closed as dropped_unparsed, and the
per-veth counters, the flow records and egress-rules say so with exact counts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.models.containers import Container
from lab import UPSTREAM_V6, Lab, run_in_netns, wait_until
from runner import Agent, nothing_left_behind, parse_records, run_cli, veth_ifindexes

from agent.datapath import IfindexCounters, open_pinned_maps, our_filters

PORT = 9444
EACH = 5  # packets of each kind
PARSED = ("ext0", "ext6")  # the parser reaches their UDP header: the rule judges them
UNREACHED = ("ext7", "ext8", "ext12")  # longer chains than the parser follows
NOT_DELIVERABLE = ("first-fragment", "truncated-udp", "truncated-ip")  # no receiver takes these
DSTOPTS = 60

_CRAFT = r"""
import socket, struct, sys
src, dst, port, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
UDP, DSTOPTS, FRAGMENT = 17, 60, 44
src_raw, dst_raw = socket.inet_pton(socket.AF_INET6, src), socket.inet_pton(socket.AF_INET6, dst)

def checksum(data):
    data += b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF or 0xFFFF

def udp(src_port, payload):
    length = 8 + len(payload)
    pseudo = src_raw + dst_raw + struct.pack("!I3xB", length, UDP)
    unsummed = struct.pack("!HHHH", src_port, port, length, 0) + payload
    return struct.pack("!HHHH", src_port, port, length, checksum(pseudo + unsummed)) + payload

def ipv6(next_header, payload):
    return struct.pack("!IHBB", 6 << 28, len(payload), next_header, 64) + src_raw + dst_raw + payload

def packet(kind):
    if kind.startswith("ext"):  # UDP behind n destination-options headers of 8 bytes (one PadN)
        n = int(kind[3:])
        chain = b"".join(struct.pack("!BB", DSTOPTS if i < n - 1 else UDP, 0) + b"\x01\x04\0\0\0\0" for i in range(n))
        return ipv6(DSTOPTS if n else UDP, chain + udp(41000 + n, b"evasion"))
    if kind == "first-fragment":  # offset 0, more fragments: the UDP header would be in a later one
        return ipv6(FRAGMENT, struct.pack("!BBHI", UDP, 0, 1, 0x1234))
    if kind == "truncated-udp":  # 2 of the UDP header's 8 bytes
        return ipv6(UDP, udp(40999, b"")[:2])
    raise SystemExit("unknown kind " + kind)

raw = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)  # we write the IPv6 header
link = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
link.bind(("eth0", 0))
own_mac = link.getsockname()[4]
for kind in sys.argv[5:]:
    for _ in range(count):
        if kind == "truncated-ip":  # 20 of the IPv6 header's 40 bytes, straight onto the link
            link.send(b"\xff" * 6 + own_mac + b"\x86\xdd" + ipv6(UDP, b"")[:20])
        else:
            raw.sendto(packet(kind), (dst, 0))
print("sent")
"""


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


def craft(lab: Lab, container: Container, kinds: tuple[str, ...]) -> None:
    source = lab.ip6(container)
    netns = f"/proc/{lab.pid(container)}/ns/net"
    assert run_in_netns(netns, _CRAFT, source, UPSTREAM_V6, PORT, EACH, *kinds) == "sent"


def veth_counters(veth: int) -> IfindexCounters | None:
    maps = open_pinned_maps()
    assert maps is not None
    try:
        return maps.read_ifindex_counters().get(veth)
    finally:
        maps.close()


def counters(**nonzero: int) -> IfindexCounters:
    return IfindexCounters(**{**dict.fromkeys(IfindexCounters.__dataclass_fields__, 0), **nonzero})


def latest_records(export: Path, veth: int) -> dict[tuple[Any, ...], dict[str, Any]]:
    """The newest record of each of the veth's flows, by (proto, src_port, dst_port)."""
    latest = {}
    for record in parse_records(export.read_text()):  # flow-record.v1.json knows the new verdict
        if record["ifindex"] == veth:
            latest[(record["proto_number"], record["src_port"], record["dst_port"])] = record
    return latest


def test_crafted_ipv6_packets_fail_closed_under_a_port_rule(lab: Lab, upstream, tmp_path: Path) -> None:
    web = lab.container("web", network=lab.network(ipv6=True))
    sink = upstream.udp_sink(PORT, address="::")
    export = tmp_path / "flows.ndjson"
    agent = Agent("-i", "0.2", "--export", str(export))
    try:
        agent.wait_ready()
        (veth,) = veth_ifindexes(lab.pid(web))
        wait_until(lambda: veth in our_filters(), timeout=10)
        # Past DAD and neighbour discovery: a ping proves the path before anything is counted.
        wait_until(lambda: web.exec_run(["ping", "-6", "-c", "1", "-W", "1", UPSTREAM_V6]).exit_code == 0, 15)

        # Control: no rule. Every extension-header datagram arrives, the unparsed ones
        # are counted on the veth and passed.
        craft(lab, web, PARSED + UNREACHED + NOT_DELIVERABLE)
        delivered = len(PARSED + UNREACHED) * EACH
        wait_until(lambda: sink.counts()[0] >= delivered, timeout=10)
        unparsed = len(UNREACHED + NOT_DELIVERABLE) * EACH
        unparsed_bytes = EACH * (sum(40 + 8 * n + 15 for n in (7, 8, 12)) + (40 + 8) + (40 + 2) + 20)
        wait_until(
            lambda: veth_counters(veth) == counters(unparsed_packets=unparsed, unparsed_bytes=unparsed_bytes),
            10,
        )
        assert sink.counts()[0] == delivered

        rule = run_cli("egress-block", web.name, UPSTREAM_V6, "--port", str(PORT), "--proto", "udp")
        assert rule.returncode == 0, rule.stderr
        craft(lab, web, PARSED + UNREACHED + NOT_DELIVERABLE)
        rule_bytes = EACH * ((40 + 15) + (40 + 48 + 15))
        wait_until(
            lambda: (
                veth_counters(veth)
                == counters(
                    dropped_packets=len(PARSED) * EACH,
                    dropped_bytes=rule_bytes,
                    unparsed_packets=2 * unparsed,
                    unparsed_bytes=2 * unparsed_bytes,
                    unparsed_dropped_packets=unparsed,
                    unparsed_dropped_bytes=unparsed_bytes,
                )
            ),
            10,
        )
        assert sink.counts()[0] == delivered  # 0 of the 25 deliverable datagrams got through

        [row] = [json.loads(line) for line in run_cli("egress-rules", "--json").stdout.splitlines()]
        assert (row["hit_packets"], row["hit_bytes"]) == (len(PARSED) * EACH, rule_bytes)
        assert row["unparsed_dropped_packets"] == unparsed
        table = run_cli("egress-rules").stdout
        assert f"{web.name}: {unparsed} packets dropped unparsed" in table

        exported_packets = {  # both phases: the control's packets and the blocked ones
            # ext7/8/12: one flow, proto = the last header read, no ports
            (DSTOPTS, None, None): 2 * len(UNREACHED) * EACH,
            (17, 0, 0): 4 * EACH,  # the first fragment and the truncated UDP header
            **{(17, 41000 + n, PORT): 2 * EACH for n in (0, 6)},  # parsed: judged by the rule, with ports
        }

        def both_phases_exported() -> dict[tuple[Any, ...], dict[str, Any]] | None:
            latest = latest_records(export, veth) if export.exists() else {}
            packets = {key: latest[key]["packets"] for key in exported_packets if key in latest}
            return latest if packets == exported_packets else None

        latest = wait_until(both_phases_exported, timeout=10)
        unblock = run_cli("egress-unblock", web.name, "--all")  # leave nothing in force
        assert unblock.returncode == 0, unblock.stderr
    finally:
        assert agent.stop() == 0
    # Nothing else: the IPv6 header cut to 20 bytes has no addresses, so no flow (ICMPv6: ping, ND)
    assert {key for key, record in latest.items() if record["proto_number"] != 58} == set(exported_packets)
    for key in ((DSTOPTS, None, None), (17, 0, 0)):
        unreached = latest[key]
        assert (unreached["dropped_packets"], unreached["verdict"], unreached["rule_id"]) == (
            exported_packets[key] // 2,
            "dropped_unparsed",
            None,
        )
    for n in (0, 6):
        judged = latest[(17, 41000 + n, PORT)]
        assert (judged["dropped_packets"], judged["verdict"], judged["rule_id"]) == (
            EACH,
            "dropped",
            row["id"],
        )
