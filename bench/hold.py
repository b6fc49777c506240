"""How long a new container is held before its packets pass (`python -m bench.hold`).

While any rule exists, the datapath drops the packets of a veth that has no endpoint
entry yet (fail closed), so a container WITHOUT rules waits for the agent to identify
its veth. Measured over 50 starts of such a container, with `egress-agent run`
running and one pending rule in a private store (so the hold is on):

- identify: the veth's peer moving into the container's netns (netlink, seen here)
  -> its endpoint entry written by the agent (polled in the pinned map);
- first packet: the container's first datagram reaching the veth (flow first_seen_ns)
  -> the first one the upstream receiver got (both CLOCK_MONOTONIC);
- held packets: what the datapath held on the veth (held_packets), at one per ms sent.
The container's own command sends one datagram per millisecond from its first instant.
First, with the same agent and no rule at all (so nothing is held), the 50 starts of
bench.latency's attach measurement: each container pings from its first instant, and
every ping it sent must be in its flow (no packet missed).
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from agent.datapath import Maps, open_pinned_maps
from agent.datapath.policy_maps import CONFIG_F_HOLD_UNKNOWN
from agent.rtnl import LinkEvents
from bench.agent_process import start_agent
from bench.common import Results, latency_summary, machine_lock, progress
from bench.environment import (
    HOST_PYTHON,
    NETWORK_BRIDGE,
    NETWORK_NAME,
    PREFIX,
    UPSTREAM_NETNS,
    Environment,
    environment,
)
from bench.latency import attach_latency

STARTS = 50
PORT = 7300
UPSTREAM_ADDRESS = "198.18.0.9"
SENDER_SOURCE = Path(__file__).resolve().parent.parent / "tests" / "senders" / "udp_every_ms.c"
BIN = Path(sys.executable).parent
RESULTS = Path(__file__).resolve().parent / "results"

# First arrival (CLOCK_MONOTONIC ns) per source port (Docker's masquerade keeps the port, not the
# address), rewritten as each new one arrives.
_RECEIVER = r"""
import json, os, socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
first, out, end = {}, sys.argv[3], time.monotonic() + float(sys.argv[4])
s.settimeout(0.5)
while time.monotonic() < end:
    try:
        _, (_, port) = s.recvfrom(64)
    except socket.timeout:
        continue
    source = str(port)
    if source not in first:
        first[source] = time.monotonic_ns()
        with open(out + ".tmp", "w") as f:
            json.dump(first, f)
        os.replace(out + ".tmp", out)
"""


class LinkWatch:
    """Times each veth of our bridge from its peer's move into a netns to its endpoint entry."""

    def __init__(self) -> None:
        self.identify_ms: dict[int, float] = {}
        self._stop = threading.Event()
        self._bridge = 0
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def start(self) -> None:
        self._bridge = socket.if_nametoindex(NETWORK_BRIDGE)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)

    def _watch(self) -> None:
        seen: set[int] = set()
        with LinkEvents(1 << 20) as events:
            while not self._stop.is_set():
                if not select.select([events], [], [], 0.2)[0]:
                    continue
                for link, removed in events.read():
                    moved = link.peer_in_other_netns
                    if not removed and moved and link.master == self._bridge and link.index not in seen:
                        seen.add(link.index)
                        threading.Thread(target=self._time_entry, args=(link.index,), daemon=True).start()

    def _time_entry(self, ifindex: int) -> None:
        moved = time.monotonic()
        maps = open_pinned_maps()
        assert maps is not None
        key = struct.pack("=I", ifindex)
        try:
            while time.monotonic() - moved < 5 and maps.endpoints.lookup(key) is None:
                time.sleep(0.0002)
            if maps.endpoints.lookup(key) is not None:
                self.identify_ms[ifindex] = (time.monotonic() - moved) * 1000
        finally:
            maps.close()


def _first_flow(ifindex: int) -> tuple[int, int] | None:
    """(source port, first_seen_ns) of the veth's flow to the receiver."""
    maps = open_pinned_maps()
    assert maps is not None
    try:
        read = maps.read_flows()
    finally:
        maps.close()
    mine = (read.keys["ifindex"] == ifindex) & (read.keys["dst_port"] == PORT)
    if not mine.any():
        return None
    return int(read.keys["src_port"][mine][0]), int(read.stats["first_seen_ns"][mine][0])


def _held_packets(ifindex: int) -> int:
    """Datagrams the datapath held on the veth (one per ms sent: about the hold in ms)."""
    maps = open_pinned_maps()
    assert maps is not None
    try:
        counters = maps.read_ifindex_counters().get(ifindex)
    finally:
        maps.close()
    return counters.held_packets if counters else 0


def measure() -> dict[str, object]:
    scratch = Path(tempfile.mkdtemp(prefix="ettb-hold-"))
    sender = scratch / "udp_every_ms"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(sender), str(SENDER_SOURCE)], check=True)
    os.environ["EGRESS_TOP_STATE_DIR"] = str(scratch / "state")
    with environment() as env:
        agent = start_agent("-i", "0.5")
        env.teardown.add("egress-agent", agent.stop)
        without_rules = _starts_without_rules(env)
        rule = subprocess.run(
            [str(BIN / "egress-block"), "--pending", f"{PREFIX}-never-started", "198.18.0.7"],
            capture_output=True,
            text=True,
        )
        if rule.returncode != 0:
            raise SystemExit(f"bench: the pending rule that turns the hold on failed: {rule.stderr.strip()}")
        if not _hold_is_on():
            raise SystemExit("bench: a rule is in the store, yet the datapath holds no unknown veth")
        arrivals = scratch / "arrivals.json"
        receiver_args = [UPSTREAM_ADDRESS, str(PORT), str(arrivals), "600"]
        receiver = subprocess.Popen(
            ["ip", "netns", "exec", UPSTREAM_NETNS, HOST_PYTHON, "-c", _RECEIVER, *receiver_args]
        )
        env.teardown.add("receiver", receiver.kill)
        watch = LinkWatch()
        watch.start()
        first_packet_ms: list[float] = []
        held_packets: list[int] = []
        for number in range(STARTS):
            container = env.client.containers.run(
                env.image,
                ["/udp_every_ms", "20", "1000", f"{UPSTREAM_ADDRESS}:{PORT}"],
                name=f"{PREFIX}-hold{number:02d}",
                network=NETWORK_NAME,
                volumes={str(sender): {"bind": "/udp_every_ms", "mode": "ro"}},
                detach=True,
            )
            try:
                ifindex = env.veth_ifindexes([container])[container.name]
                flow = _first_flow(ifindex)
                source = str(flow[0]) if flow else ""
                deadline = time.monotonic() + 10
                first: dict[str, int] = {}
                while source and source not in first and time.monotonic() < deadline:
                    first = json.loads(arrivals.read_text()) if arrivals.exists() else {}
                    time.sleep(0.01)
                if flow is not None and source in first:
                    first_packet_ms.append((first[source] - flow[1]) / 1e6)
                held_packets.append(_held_packets(ifindex))
            finally:
                container.remove(force=True)
            progress(f"start {number + 1}/{STARTS}")
        watch.stop()
    identify = list(watch.identify_ms.values())
    return {
        "starts": STARTS,
        "without_rules": without_rules,
        "identify_ms": latency_summary(identify),
        "first_packet_held_ms": latency_summary(first_packet_ms),
        "held_packets": latency_summary(held_packets),
        "held_packets_each": sorted(held_packets),
        "identify_ms_each": sorted(round(value, 2) for value in identify),
        "first_packet_held_ms_each": sorted(round(value, 2) for value in first_packet_ms),
        "method": __doc__.strip().splitlines()[0],
    }


def _hold_is_on() -> bool:
    maps = Maps()  # the agent's pins: it made them before it said it is ready
    try:
        return bool(maps.config.flags & CONFIG_F_HOLD_UNKNOWN)
    finally:
        maps.close()


def _starts_without_rules(env: Environment) -> dict[str, object]:
    """bench.latency's attach measurement over STARTS starts, with no rule in the store."""
    if _hold_is_on():
        raise SystemExit("bench: the datapath holds unknown veths with no rule in the store")
    maps = Maps()
    try:
        return attach_latency(env, maps, STARTS)
    finally:
        maps.close()


def main() -> None:
    with machine_lock():
        data = measure()
    path = Results(RESULTS).write("hold", data)
    progress(f"wrote {path}: {json.dumps({k: data[k] for k in ('identify_ms', 'first_packet_held_ms')})}")
    attach = data["without_rules"]
    progress(f"no rule: no packet missed in {attach['tries_with_no_packet_missed']}/{attach['tries']} starts")  # type: ignore[index]


if __name__ == "__main__":
    main()
