"""A noisy neighbour cannot erase anyone's accounting (issue 11), end to end.

Real containers, the real datapath, `egress-top --json`: while container B sprays 400,000
one-datagram flows (six times the default 65,536-entry flow table), container A sends
1,000 datagrams of 64 B to one address. A's container records sum to exactly 1,000
packets and 92,000 bytes; B's are exact too, though its flows past its flow share are in
no flow record: they show as overflow in its container records and the interval records.

B's spray is raw frames written to its eth0 (AF_PACKET, the host's python in B's netns),
each a UDP datagram to the upstream netns address with its own port pair and a wrong IP
header checksum: the datapath on the host-side veth counts every one, then the kernel
drops it before conntrack or routing, so 400,000 flows leave no state and reach no one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from docker.models.containers import Container
from docker.models.networks import Network
from lab import UPSTREAM_V4, Lab, run_in_netns, wait_until
from runner import EgressTop, nothing_left_behind, veth_ifindexes

A_PORT = 5901
A_DATAGRAMS, A_PAYLOAD = 1000, 64
UDP4_OVERHEAD = 28  # IPv4 and UDP headers: flows and totals count IP bytes
B_FLOWS, B_PAYLOAD = 400_000, 8
B_FIRST_DST_PORT = 20000  # B's flows: every source port 1..65535 to dst ports from here up
SPRAY_SECONDS = 20

# argv: bridge MAC, source address, destination address, flows, payload bytes, first dst port
_SPRAY = r"""
import socket, struct, sys, time
bridge_mac, src, dst = bytes.fromhex(sys.argv[1].replace(":", "")), sys.argv[2], sys.argv[3]
flows, payload_bytes, first_dst_port = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
own_mac = bytes.fromhex(open("/sys/class/net/eth0/address").read().strip().replace(":", ""))
udp_length = 8 + payload_bytes
header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + udp_length, 0, 0x4000, 64, 17, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
words = sum(struct.unpack("!10H", header))
while words > 0xFFFF:
    words = (words & 0xFFFF) + (words >> 16)
wrong_checksum = words  # the right one is its complement: the kernel drops these unrouted
header = header[:10] + struct.pack("!H", wrong_checksum) + header[12:]
prefix, payload = bridge_mac + own_mac + b"\x08\x00" + header, b"z" * payload_bytes
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
deadline, sent = time.monotonic() + float(sys.argv[7]), 0
for n in range(flows):
    if n % 4096 == 0 and time.monotonic() > deadline:
        break
    ports = struct.pack("!HHHH", n % 65535 + 1, first_dst_port + n // 65535, udp_length, 0)
    s.send(prefix + ports + payload)
    sent += 1
print(sent)
"""


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    """A private rule store; the leftover check runs while the lab's veths still exist."""
    yield from nothing_left_behind(tmp_path, monkeypatch)


def bridge_mac(network: Network) -> str:
    network.reload()
    name = network.attrs["Options"].get("com.docker.network.bridge.name") or f"br-{network.id[:12]}"
    return Path(f"/sys/class/net/{name}/address").read_text().strip()


def spray(lab: Lab, container: Container, network: Network, sent: list[int]) -> None:
    out = run_in_netns(
        f"/proc/{lab.pid(container)}/ns/net",
        _SPRAY,
        bridge_mac(network),
        lab.ip(container),
        UPSTREAM_V4,
        B_FLOWS,
        B_PAYLOAD,
        B_FIRST_DST_PORT,
        SPRAY_SECONDS,
        timeout=SPRAY_SECONDS + 30,
    )
    sent.append(int(out))


def of(records: list[dict[str, Any]], record_type: str, name: str | None = None) -> list[dict[str, Any]]:
    return [r for r in list(records) if r["type"] == record_type and name in (None, r.get("container_name"))]


def test_a_noisy_neighbours_spray_leaves_a_quiet_containers_totals_exact(lab: Lab, upstream) -> None:
    network = lab.network()
    quiet, noisy = lab.container("quiet", network=network), lab.container("noisy", network=network)
    sink = upstream.udp_sink(A_PORT)
    top = EgressTop(interval=0.5)
    sent: list[int] = []
    sprayer = threading.Thread(target=spray, args=(lab, noisy, network, sent), daemon=True)
    try:
        top.wait_attached(veth_ifindexes(lab.pid(quiet)) | veth_ifindexes(lab.pid(noisy)))
        wait_until(lambda: of(top.others, "interval"), timeout=10)  # a baseline read is behind us
        sprayer.start()
        # B is past its flow share before A sends: the table is under pressure while A counts
        wait_until(
            lambda: any(r["overflow_packets_delta"] for r in of(top.others, "container", noisy.name)), 20
        )
        # paced: the sink's socket buffer would drop part of a burst, and the sink is the control
        lab.send_udp(quiet, UPSTREAM_V4, A_PORT, count=A_DATAGRAMS, size=A_PAYLOAD, interval=0.0005)
        sprayer.join(timeout=SPRAY_SECONDS + 40)
        assert sent, "the spray did not finish"
        assert sink.wait_for(A_DATAGRAMS, timeout=10) == (A_DATAGRAMS, A_DATAGRAMS * A_PAYLOAD)  # control

        def b_counted() -> int:
            return sum(r["packets_delta"] for r in of(top.others, "container", noisy.name))

        wait_until(lambda: b_counted() >= sent[0], timeout=10)
        wait_until(lambda: sum(r["packets_delta"] for r in of(top.others, "container", quiet.name)), 10)
        top_intervals = len(of(top.others, "interval"))
        wait_until(lambda: len(of(top.others, "interval")) >= top_intervals + 2, timeout=10)  # settled
    finally:
        assert top.stop() == 0, top.stderr
    a = of(top.others, "container", quiet.name)
    assert (sum(r["packets_delta"] for r in a), sum(r["bytes_delta"] for r in a)) == (1000, 92000)
    assert (a[-1]["packets"], a[-1]["bytes"]) == (1000, 92000)  # its cumulative totals agree
    b = of(top.others, "container", noisy.name)
    b_packets, b_overflow = sum(r["packets_delta"] for r in b), sum(r["overflow_packets_delta"] for r in b)
    assert sent[0] == B_FLOWS, f"the spray stopped at its time bound after {sent[0]} frames"
    assert (b_packets, sum(r["bytes_delta"] for r in b)) == (B_FLOWS, B_FLOWS * (UDP4_OVERHEAD + B_PAYLOAD))
    # B's flows past its share are in no flow record: its flow records tell only the rest
    b_in_flows = sum(r["packets_delta"] for r in top.records if r["container_name"] == noisy.name)
    assert b_overflow > 0 and b_in_flows + b_overflow == B_FLOWS, (b_in_flows, b_overflow)
    intervals = of(top.others, "interval")
    assert sum(r["overflow_packets"] for r in intervals) == b_overflow
    assert max(r["containers_overflowing"] for r in intervals) == 1
    assert all(r["flow_table_size"] == 65536 for r in intervals)
