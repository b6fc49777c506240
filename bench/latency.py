"""Latencies with `egress-agent run` running: a new container's first packets, and how
soon egress-block / egress-unblock take effect, read from the datapath's own counters."""

from __future__ import annotations

import itertools
import re
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import numpy as np

from agent.datapath import FLOW_KEY_DTYPE, Maps, our_filters
from agent.datapath.flow_maps import FlowTableRead
from bench.agent_process import start_agent
from bench.common import BIN, Results, Settings, latency_summary, progress, spread, wait_until
from bench.environment import (
    HOST_PYTHON,
    UPSTREAM_BLOCKED,
    UPSTREAM_NETNS,
    UPSTREAM_PING,
    Environment,
    netns_exec,
)

PINGS = 20
PING_INTERVAL = "0.01"
BLOCK_PORT = 5999
SENDER_PORT = 40999
SEND_PERIOD = 0.001  # the block/unblock sender: one datagram per millisecond
POLL_PERIOD = 0.0002  # the counter poller
PAUSE = 0.25  # between a block and the unblock, and between cycles
VERDICT_DROPPED = 1
IPPROTO_ICMP, IPPROTO_UDP = 1, 17
FLOW_KEY = struct.Struct("=IBBHHH16s16s")  # struct flow_key

# One datagram per SEND_PERIOD, from a fixed port (so the flow key is known), bounded in
# count and time. Run by the host's Python inside the container's netns.
SENDER = r"""
import socket, sys, time
dst, port, src_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seconds, period = float(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", src_port))
start = time.monotonic()
limit = int(seconds / period)
for seq in range(limit):
    try:
        s.sendto(seq.to_bytes(4, "big"), (dst, port))
    except OSError:
        pass
    time.sleep(max(0.0, start + (seq + 1) * period - time.monotonic()))
"""
# Somewhere for the datagrams to go (no ICMP port-unreachable back), bounded in time.
DISCARD = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
s.settimeout(0.5)
end = time.monotonic() + float(sys.argv[3])
while time.monotonic() < end:
    try:
        s.recv(64)
    except socket.timeout:
        pass
"""


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)  # the clock of bpf_ktime_get_ns


def _address_bytes(address: str) -> bytes:
    return IPv4Address(address).packed.ljust(16, b"\0")  # as struct flow_key holds IPv4


def _to(keys: np.ndarray, address: str) -> np.ndarray:
    """Rows of the flow table whose destination is `address`."""
    return keys["dst_addr"].view("S16") == _address_bytes(address)


def udp_flow_key(ifindex: int, source: str, source_port: int, destination: str, port: int) -> bytes:
    """struct flow_key (bpf/egress_maps.h) of one UDP flow."""
    key = FLOW_KEY.pack(
        ifindex, 4, IPPROTO_UDP, source_port, port, 0, _address_bytes(source), _address_bytes(destination)
    )
    assert len(key) == FLOW_KEY_DTYPE.itemsize
    return key


# --- attach: container start -> first packet counted ----------------------------------


def attach_latency(env: Environment, maps: Maps, tries: int) -> dict[str, Any]:
    """Each container pings from its first instant (a numbered burst: PINGS echo requests,
    PING_INTERVAL apart); the pings its flow counted versus the ones ping sent are the
    packets missed before our program was on its veth."""
    missed, first_counted_ms, sent_total, counted_total = [], [], 0, 0
    for attempt in range(tries):
        # The pings of earlier tries stay counted (the table and the flow cache keep them):
        # this try's are the flows that are new or grew since.
        earlier = _pings_by_flow(maps.read_flows())
        container = env.container(
            f"start{attempt:02d}",
            ["ping", "-c", str(PINGS), "-i", PING_INTERVAL, "-W", "1", UPSTREAM_PING],
            start=False,
        )
        start_called = _monotonic_ns()
        container.start()
        container.wait(timeout=30)
        sent = _pings_sent(container.logs().decode())
        now = _pings_by_flow(maps.read_flows())
        counted = sum(packets - earlier.get(key, (0, 0))[0] for key, (packets, _) in now.items())
        missed.append(sent - counted)
        sent_total, counted_total = sent_total + sent, counted_total + counted
        new_flows = [first_seen for key, (_, first_seen) in now.items() if key not in earlier]
        if new_flows:
            first_counted_ms.append((min(new_flows) - start_called) / 1e6)
        env.remove(container)
    return {
        "tries": tries,
        "pings_per_try": PINGS,
        "ping_interval_seconds": float(PING_INTERVAL),
        "tries_with_no_packet_missed": sum(1 for m in missed if m == 0),
        "pings_sent": sent_total,
        "pings_counted": counted_total,
        "missed_packets": spread([float(m) for m in missed]),
        "start_call_to_first_counted_ms": latency_summary(first_counted_ms) if first_counted_ms else None,
    }


def _pings_sent(log: str) -> int:
    match = re.search(r"(\d+) packets transmitted", log)
    if match is None:
        raise RuntimeError(f"ping printed no summary: {log[-300:]!r}")
    return int(match.group(1))


def _pings_by_flow(read: FlowTableRead) -> dict[bytes, tuple[int, int]]:
    """Flow key -> (packets, first_seen_ns) of the ICMP flows to UPSTREAM_PING."""
    rows = np.flatnonzero((read.keys["proto"] == IPPROTO_ICMP) & _to(read.keys, UPSTREAM_PING))
    return {
        read.keys[row].tobytes(): (int(read.stats["packets"][row]), int(read.stats["first_seen_ns"][row]))
        for row in rows.tolist()
    }


# --- block / unblock: CLI exit -> first packet dropped / passing ----------------------


@dataclass(frozen=True)
class Reading:
    """The sender's flow, as one poll saw it."""

    polled_ns: int
    packets: int
    dropped: int
    last_seen_ns: int
    verdict: int

    @property
    def forwarded(self) -> int:
        return self.packets - self.dropped


class FlowPoller(threading.Thread):
    """Reads one flow's counters every POLL_PERIOD and keeps every change."""

    def __init__(self, maps: Maps, key: bytes):
        super().__init__(daemon=True)
        self.maps, self.key = maps, key
        self.readings: list[Reading] = []
        self.stop_event = threading.Event()

    def run(self) -> None:
        previous = None
        while not self.stop_event.is_set():
            read = self.maps.lookup_flows(np.frombuffer(self.key, FLOW_KEY_DTYPE))  # per-CPU copies merged
            if len(read.stats):
                stats = read.stats[0]
                counters = (int(stats["packets"]), int(stats["dropped_packets"]))
                if counters != previous:
                    previous = counters
                    self.readings.append(
                        Reading(_monotonic_ns(), *counters, int(stats["last_seen_ns"]), int(stats["verdict"]))
                    )
            time.sleep(POLL_PERIOD)

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


@dataclass(frozen=True)
class Cycle:
    """One egress-block / egress-unblock pair, in CLOCK_MONOTONIC nanoseconds."""

    block_called: int
    block_returned: int
    unblock_called: int
    unblock_returned: int

    def first_change(self, readings: list[Reading], after: int, counter: str) -> int | None:
        """When the first packet after `after` moved `counter` (dropped or forwarded): its own
        timestamp when the poll saw it alone, else the poll time (a bound)."""
        for previous, reading in itertools.pairwise(readings):
            if reading.polled_ns <= after:
                continue
            grew = getattr(reading, counter) - getattr(previous, counter)
            if grew > 0:
                alone = grew == 1 and reading.packets - previous.packets == 1
                return reading.last_seen_ns if alone else reading.polled_ns
        return None

    def forwarded_while_blocked(self, readings: list[Reading]) -> int:
        """Packets that passed after egress-block returned and before egress-unblock was run."""
        at_return = [r for r in readings if r.polled_ns <= self.block_returned]
        before_unblock = [r for r in readings if r.polled_ns <= self.unblock_called]
        if not at_return or not before_unblock:
            return 0
        return before_unblock[-1].forwarded - at_return[-1].forwarded


def _timed(command: list[str]) -> tuple[int, int]:
    called = _monotonic_ns()
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return called, _monotonic_ns()


def block_latency(env: Environment, maps: Maps, tries: int) -> dict[str, Any]:
    """A sender in the container sends a datagram every ms; each cycle runs egress-block,
    waits, runs egress-unblock, waits. A poller reads the sender's flow counters."""
    container = env.container("blocked")
    ifindex = env.veth_ifindexes([container])[container.name]
    wait_until(lambda: ifindex in our_filters(), 30, "the agent to attach to the sender's container")
    container.reload()
    address = container.attrs["NetworkSettings"]["Networks"]["ettb-net"]["IPAddress"]
    seconds = tries * (2 * PAUSE + 2.0) + 5  # generous: the commands take well under 1 s each
    discard_args = [UPSTREAM_BLOCKED, str(BLOCK_PORT), str(seconds + 5)]
    discard = subprocess.Popen(
        ["ip", "netns", "exec", UPSTREAM_NETNS, HOST_PYTHON, "-c", DISCARD, *discard_args]
    )
    sender_args = [UPSTREAM_BLOCKED, str(BLOCK_PORT), str(SENDER_PORT), str(seconds), str(SEND_PERIOD)]
    sender = subprocess.Popen([*netns_exec(env.pid(container)), HOST_PYTHON, "-c", SENDER, *sender_args])
    poller = FlowPoller(maps, udp_flow_key(ifindex, address, SENDER_PORT, UPSTREAM_BLOCKED, BLOCK_PORT))
    poller.start()
    cycles, block_seconds, unblock_seconds = [], [], []
    target = [container.name, UPSTREAM_BLOCKED]
    try:
        wait_until(lambda: len(poller.readings) > 100, 10, "the sender's flow to be counted")
        for _ in range(tries):
            block_called, block_returned = _timed([str(BIN / "egress-block"), *target])
            time.sleep(PAUSE)
            unblock_called, unblock_returned = _timed([str(BIN / "egress-unblock"), *target])
            time.sleep(PAUSE)
            cycles.append(Cycle(block_called, block_returned, unblock_called, unblock_returned))
            block_seconds.append((block_returned - block_called) / 1e9)
            unblock_seconds.append((unblock_returned - unblock_called) / 1e9)
    finally:
        poller.stop()
        for process in (sender, discard):
            process.kill()
            process.wait()
    env.remove(container)
    readings = poller.readings
    to_drop, to_pass, unseen = [], [], 0
    for cycle in cycles:
        dropped_at = cycle.first_change(readings, cycle.block_called, "dropped")
        passing_at = cycle.first_change(readings, cycle.unblock_called, "forwarded")
        if dropped_at is None or passing_at is None:
            unseen += 1
            continue
        to_drop.append((dropped_at - cycle.block_returned) / 1e6)
        to_pass.append((passing_at - cycle.unblock_returned) / 1e6)
    return {
        "tries": tries,
        "send_period_ms": 1000 * SEND_PERIOD,
        "poll_period_ms": 1000 * POLL_PERIOD,
        "block_returned_to_first_drop_ms": latency_summary(to_drop) if to_drop else None,
        "unblock_returned_to_first_pass_ms": latency_summary(to_pass) if to_pass else None,
        "cycles_without_a_change_seen": unseen,
        "packets_forwarded_after_block_returned": sum(c.forwarded_while_blocked(readings) for c in cycles),
        "egress_block_command_seconds": spread(block_seconds),
        "egress_unblock_command_seconds": spread(unblock_seconds),
    }


def latencies(env: Environment, settings: Settings, results: Results) -> Path:
    agent = start_agent("-i", "1")
    env.teardown.add("egress-agent", agent.stop)
    maps = Maps()
    try:
        attach = attach_latency(env, maps, settings.attach_tries)
        progress(
            f"attach: no packet missed in {attach['tries_with_no_packet_missed']}/{attach['tries']} starts"
        )
        block = block_latency(env, maps, settings.block_tries)
    finally:
        maps.close()
        agent.stop()
    return results.write("latency", {"agent": "egress-agent run -i 1", "attach": attach, "block": block})
