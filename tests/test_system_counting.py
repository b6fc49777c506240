"""What the datapath counts, for real, where README makes a promise: GSO super-packets,
IPv6 extension headers, non-IP frames, and LRU evictions on a full flow table.

Traffic goes only to the lab's own containers and its `upstream` netns.
"""

from __future__ import annotations

import re
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import UPSTREAM_V4, UPSTREAM_V6, Lab, run_in_netns, wait_until
from runner import BIN, EgressTop, nothing_left_behind, run_cli, veth_ifindexes

from agent.datapath import open_pinned_maps, our_filters

IPV6_UDP_OVERHEAD = 48


@pytest.fixture(autouse=True)
def nothing_of_ours_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


def netns_of(lab: Lab, container) -> str:  # type: ignore[no-untyped-def]
    return f"/proc/{lab.pid(container)}/ns/net"


_TCP_BULK = r"""
import socket, struct, sys
dst, port, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.create_connection((dst, port), timeout=10)
s.sendall(b"z" * size)
s.shutdown(socket.SHUT_WR)
while s.recv(65536):  # the sink closes on our FIN: every segment of ours is sent and acked
    pass
info = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
# struct tcp_info: tcpi_segs_out (u32) at offset 136 counts segments, a GSO packet as its segments
print(s.getsockname()[1], struct.unpack_from("=I", info, 136)[0])
"""


def test_a_tcp_bulk_transfer_counts_segments_not_super_packets(lab: Lab, upstream) -> None:
    payload, port = 4 * 1024 * 1024, 5101
    sink = upstream.tcp_sink(port)
    sender = lab.container("bulk", network=lab.network())
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab.pid(sender)))
        src_port, segments = map(
            int, run_in_netns(netns_of(lab, sender), _TCP_BULK, UPSTREAM_V4, port, payload).split()
        )
        wait_until(lambda: sink.counts() == (1, payload), timeout=10)
        key = (lab.ip(sender), src_port, UPSTREAM_V4, port, "tcp")
        wait_until(lambda: top.flows_of(sender.name).get(key, {}).get("packets") == segments, timeout=5)
    finally:
        assert top.stop() == 0, top.stderr
    record = top.flows_of(sender.name)[key]
    # the sender's own count of segments it sent (SYN, data, ACKs, FIN): exactly what we counted
    assert record["packets"] == segments
    # and the transfer did go out as GSO super-packets: fewer IP headers than segments were
    # counted (each segment on the wire carries at least 40 bytes of IP + TCP header)
    assert payload < record["bytes"] < payload + 40 * segments
    assert segments > payload // 65536  # sanity: at least one segment per 64 KiB


_UDP6_WITH_EXTENSION_HEADERS = r"""
import socket, sys, time
dst, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
end = time.monotonic() + 5
while time.monotonic() < end and any(int(line.split()[4], 16) & 0x40 for line in open("/proc/net/if_inet6")):
    time.sleep(0.05)  # a tentative (DAD) address cannot be a source yet
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
# 8-byte hop-by-hop and destination-options headers, each holding one PadN option
pad = b"\x00\x00\x01\x04\x00\x00\x00\x00"
s.setsockopt(socket.IPPROTO_IPV6, 54, pad)  # IPV6_HOPOPTS
s.setsockopt(socket.IPPROTO_IPV6, 59, pad)  # IPV6_DSTOPTS
for _ in range(count):
    s.sendto(b"e" * size, (dst, port))
print(s.getsockname()[1])
"""


def test_ipv6_udp_behind_extension_headers_is_counted_on_its_5_tuple(lab: Lab, upstream) -> None:
    """A short chain (hop-by-hop, destination options): the ports behind it key the flow."""
    count, size, port = 9, 100, 5102
    sink = upstream.udp_sink(port, address="::")
    sender = lab.container("ext6", network=lab.network(ipv6=True))
    top = EgressTop()
    try:
        top.wait_attached(veth_ifindexes(lab.pid(sender)))
        src_port = int(
            run_in_netns(netns_of(lab, sender), _UDP6_WITH_EXTENSION_HEADERS, UPSTREAM_V6, port, count, size)
        )
        assert sink.wait_for(count, timeout=5) == (count, count * size)
        key = (lab.ip6(sender), src_port, UPSTREAM_V6, port, "udp")
        wait_until(lambda: top.flows_of(sender.name).get(key, {}).get("packets") == count, timeout=5)
    finally:
        assert top.stop() == 0, top.stderr
    record = top.flows_of(sender.name)[key]
    assert (record["family"], record["proto_number"], record["verdict"]) == ("ipv6", 17, "forwarded")
    assert record["bytes"] == count * (size + IPV6_UDP_OVERHEAD + 8 + 8)  # the two headers are IP bytes
    assert [k for k in top.flows_of(sender.name) if k[4] == "udp"] == [key]


_RAW_FRAMES = r"""
import socket, sys
count, ethertype = int(sys.argv[1]), int(sys.argv[2], 16)
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("eth0", 0))
frame = b"\xff" * 6 + s.getsockname()[4] + ethertype.to_bytes(2, "big") + b"\0" * 46
for _ in range(count):
    s.send(frame)
print(len(frame))
"""


def test_non_ip_frames_are_counted_per_veth_are_no_flows_and_pass_a_block_all_rule(
    lab: Lab, upstream
) -> None:
    count, ethertype = 13, 0x88B5  # IEEE local experimental: nothing else sends it
    network = lab.network()
    sender = lab.container("nonip", network=network)
    (ifindex,) = veth_ifindexes(lab.pid(sender))
    sink = upstream.udp_sink(5103)
    top = EgressTop()
    try:
        top.wait_attached({ifindex})
        block = run_cli("egress-block", sender.name, "0.0.0.0/0")
        assert block.returncode == 0, block.stderr
        # control: the rule is in force for IP, the datagrams are dropped
        src_port = lab.send_udp(sender, UPSTREAM_V4, 5103, count=3, size=10)
        key = (lab.ip(sender), src_port, UPSTREAM_V4, 5103, "udp")
        wait_until(lambda: top.flows_of(sender.name).get(key, {}).get("dropped_packets") == 3, timeout=5)
        maps = open_pinned_maps()
        assert maps is not None
        try:
            before = maps.read_ifindex_counters()[ifindex]
            with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype)) as bridge:
                bridge.bind((f"br-{network.id[:12]}", ethertype))
                frame_length = int(run_in_netns(netns_of(lab, sender), _RAW_FRAMES, count, f"{ethertype:x}"))
                bridge.settimeout(5)
                arrived = [len(bridge.recv(65535)) for _ in range(count)]
            expected = (before.non_ip_packets + count, before.non_ip_bytes + count * frame_length)

            def non_ip() -> tuple[int, int]:
                now = maps.read_ifindex_counters()[ifindex]
                return now.non_ip_packets, now.non_ip_bytes

            wait_until(lambda: non_ip() == expected, timeout=5)
            after = maps.read_ifindex_counters()[ifindex]
        finally:
            maps.close()
    finally:
        assert top.stop() == 0, top.stderr
        assert run_cli("egress-unblock", sender.name, "--all").returncode == 0
    assert frame_length == 60 and arrived == [60] * count  # every frame reached the bridge
    assert (after.dropped_packets, after.dropped_bytes) == (before.dropped_packets, before.dropped_bytes)
    assert sink.counts() == (0, 0)
    assert list(top.flows_of(sender.name)) == [key]  # the frames are no flow


_DISTINCT_FLOWS = r"""
import socket, sys, time
dst, first_port, count, gap = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for port in range(first_port, first_port + count):
    s.sendto(b"f", (dst, port))
    time.sleep(gap)
print(s.getsockname()[1])
"""

# the header ends with the fill, then what the interval lost when it lost something
_FILL = re.compile(r" flows (\d+)/(\d+)(?: \((\d+) evicted\))?(?: LOSS this interval: .*)?$")


class PlainTop:
    """egress-top's plain output (stdout a pipe) in the background; keeps each header's fill."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [str(BIN / "egress-top"), "-i", "0.2", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.fills: list[tuple[int, int, int]] = []  # (used, size, evicted)
        self.headers: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            match = _FILL.search(line.rstrip("\n")) if line.startswith("egress-top ") else None
            if match:
                self.headers.append(line)
                used, size, evicted = match.groups()
                self.fills.append((int(used), int(size), int(evicted or 0)))

    def stop(self) -> tuple[int, str]:
        self.proc.terminate()
        code = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        return code, self.proc.stderr.read() if self.proc.stderr else ""  # type: ignore[union-attr]


def test_a_full_flow_table_evicts_and_the_header_counts_it(lab: Lab, upstream) -> None:
    size, flows = 1024, 3000
    sender = lab.container("churn", network=lab.network())
    top = PlainTop("--flow-table-size", str(size))
    try:
        wait_until(lambda: veth_ifindexes(lab.pid(sender)) <= set(our_filters()), timeout=15)
        wait_until(lambda: top.fills, timeout=5)
        used_before, _, evicted_before = top.fills[-1]
        # one container may create table/8 flows per refresh (its flow share; past it, its
        # overflow flow counts the rest): 3 ms apart, it stays well inside it at -i 0.2
        run_in_netns(netns_of(lab, sender), _DISTINCT_FLOWS, UPSTREAM_V4, 20000, flows, 0.003)
        created = used_before + evicted_before + flows

        def settled() -> tuple[int, int, int] | None:
            fill = top.fills[-1]
            return fill if fill[0] + fill[2] >= created else None

        try:
            used, table_size, evicted = wait_until(settled, timeout=5)
        except AssertionError as exc:
            raise AssertionError(f"{exc}: {created} flows created, the last fills {top.fills[-3:]}") from None
        settled_at = len(top.fills)
        wait_until(lambda: len(top.fills) >= settled_at + 2, timeout=5)
    finally:
        code, stderr = top.stop()
    assert (code, stderr) == (0, "")
    assert table_size == size
    # every flow the datapath created is either in the table or counted as evicted
    assert used + evicted == created, top.fills[-5:]
    assert used <= size and evicted >= flows - size
    assert top.fills[-1] == (used, table_size, evicted)  # nothing more moved: the figure is stable
    assert not [h for h in top.headers if "overflow" in h]  # every flow was a flow of its own
