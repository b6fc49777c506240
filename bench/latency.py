"""Latencies with egress-agent running: a new container's first packets, and how soon
egress-block / egress-unblock take effect, measured by what the upstream received."""

from __future__ import annotations

import itertools
import json
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import PYTHON, UPSTREAM_V4, UPSTREAM_V4_BLOCKME, wait_until
from runner import veth_ifindexes

from agent.datapath import Maps, our_filters
from bench.common import REPO, Environment, Settings, percentile, summary, write_result

BIN = REPO / ".venv" / "bin"
PINGS = 20
SEND_PERIOD = 0.001  # the block sender: one datagram per millisecond

# Every datagram carries its sequence number and CLOCK_MONOTONIC send time (one
# clock for every netns on the host), so the receiver knows when each was sent.
SENDER = r"""
import socket, struct, sys, time
dst, port, seconds, period = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
start = time.clock_gettime(time.CLOCK_MONOTONIC)
seq = 0
while True:
    now = time.clock_gettime(time.CLOCK_MONOTONIC)
    if now - start > seconds:
        break
    try:
        s.sendto(struct.pack("!Id", seq, now), (dst, port))
    except OSError:
        pass  # a dropped datagram can come back as an error on the socket
    seq += 1
    time.sleep(max(0.0, start + seq * period - time.clock_gettime(time.CLOCK_MONOTONIC)))
print(seq)
"""
RECEIVER = r"""
import json, socket, struct, sys, time
address, port, seconds, out = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((address, port))
s.settimeout(0.5)
received = []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        received.append(struct.unpack("!Id", s.recv(64)))
    except socket.timeout:
        continue
json.dump(received, open(out, "w"))
"""


@dataclass(frozen=True)
class Window:
    """One block/unblock cycle, in CLOCK_MONOTONIC seconds."""

    block_started: float
    blocked: float  # egress-block returned
    unblock_started: float
    unblocked: float  # egress-unblock returned

    def gap(self, received: dict[int, float]) -> tuple[float, float]:
        """Send times of the first datagram lost in this cycle and of the first one
        through again after it. Sequence numbers make the lost ones visible."""
        in_cycle = sorted(
            seq for seq, sent in received.items() if self.block_started - 0.05 <= sent <= self.unblocked + 0.2
        )
        if len(in_cycle) < 100:
            raise RuntimeError("the sender was not sending during a block cycle")
        for before, after in itertools.pairwise(in_cycle):
            if after - before > 1:
                return received[before] + SEND_PERIOD, received[after]
        raise AssertionError("the sender kept getting through during a block cycle")


def _agent() -> subprocess.Popen[str]:
    """egress-agent run, returned once it says it is ready; its stderr keeps being drained."""
    agent = subprocess.Popen(
        [str(BIN / "egress-agent"), "run", "-i", "0.2"], stderr=subprocess.PIPE, text=True
    )
    assert agent.stderr is not None
    for line in agent.stderr:
        if "ready" in line:
            break
    else:
        raise RuntimeError(f"egress-agent exited before it was ready: {agent.wait()}")
    threading.Thread(target=agent.stderr.read, daemon=True).start()
    return agent


def _timed(*command: str | Path) -> tuple[float, float]:
    """CLOCK_MONOTONIC when the command started and when it returned."""
    started = time.clock_gettime(time.CLOCK_MONOTONIC)
    subprocess.run([str(part) for part in command], check=True, capture_output=True)
    return started, time.clock_gettime(time.CLOCK_MONOTONIC)


def attach_latency(env: Environment, settings: Settings) -> dict[str, Any]:
    """Container start -> first packet counted, and pings missed before the attach."""
    net = env.lab.network()
    agent = _agent()
    missed, first_counted = [], []
    try:
        maps = Maps()
        for attempt in range(settings.tries):
            for key in maps.flows.list_keys():
                maps.flows.delete(key)
            container = env.lab.container(
                f"ettb-start{attempt}",
                network=net,
                start=False,
                command=["ping", "-c", str(PINGS), "-i", "0.05", "-W", "1", UPSTREAM_V4],
            )
            started = time.clock_gettime(time.CLOCK_MONOTONIC)
            container.start()
            container.wait(timeout=30)
            read = maps.read_flows()
            pings = read.keys["proto"] == 1
            counted = int(read.stats["packets"][pings].sum())
            missed.append(PINGS - counted)
            if counted:
                first_counted.append(int(read.stats["first_seen_ns"][pings].min()) / 1e9 - started)
            container.remove(force=True)
        maps.close()
    finally:
        agent.terminate()
        agent.wait(timeout=30)
    no_miss = sum(1 for m in missed if m == 0) / len(missed)
    return {
        "tries": len(missed),
        "pings_per_try": PINGS,
        "tries_with_no_packet_missed": no_miss,
        "missed_packets": summary([float(m) for m in missed]),
        "start_call_to_first_counted_ms": {
            "p50": 1000 * percentile(first_counted, 0.5),
            "p99": 1000 * percentile(first_counted, 0.99),
        }
        if first_counted
        else None,
    }


def block_latency(env: Environment, settings: Settings) -> dict[str, Any]:
    """egress-block returning -> first dropped datagram; egress-unblock returning -> passing again.
    Negative: the rule was in force before the command returned."""
    container = env.lab.container("ettb-blocked", network=env.lab.network())
    agent = _agent()
    seconds = settings.tries * 2.5 + 10  # a cycle is ~1.5 s: two commands and two pauses
    with tempfile.TemporaryDirectory(prefix="ettb-latency-") as scratch:
        received_file = Path(scratch) / "received.json"
        receiver = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                env.upstream.netns,
                PYTHON,
                "-c",
                RECEIVER,
                UPSTREAM_V4_BLOCKME,
                "5999",
                str(seconds + 5),
                str(received_file),
            ]
        )
        sender = None
        try:
            wait_until(lambda: veth_ifindexes(env.lab.pid(container)) <= set(our_filters()), timeout=30)
            time.sleep(1)
            sender = subprocess.Popen(
                [
                    "nsenter",
                    f"--net=/proc/{env.lab.pid(container)}/ns/net",
                    PYTHON,
                    "-c",
                    SENDER,
                    UPSTREAM_V4_BLOCKME,
                    "5999",
                    str(seconds),
                    str(SEND_PERIOD),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            time.sleep(0.5)
            windows, command_seconds = [], []
            for _ in range(settings.tries):
                block_started, blocked = _timed(BIN / "egress-block", container.name, UPSTREAM_V4_BLOCKME)
                time.sleep(0.3)
                unblock_started, unblocked = _timed(
                    BIN / "egress-unblock", container.name, UPSTREAM_V4_BLOCKME
                )
                command_seconds.append(blocked - block_started)
                windows.append(Window(block_started, blocked, unblock_started, unblocked))
                time.sleep(0.3)
            sender.wait(timeout=seconds + 10)
            receiver.wait(timeout=30)
            received = {seq: sent for seq, sent in json.loads(received_file.read_text())}
        finally:
            for process in (sender, receiver):
                if process is not None and process.poll() is None:
                    process.kill()
            agent.terminate()
            agent.wait(timeout=30)
    block_ms, unblock_ms, leaked = [], [], 0
    for window, (first_lost, first_back) in zip(windows, (w.gap(received) for w in windows), strict=True):
        block_ms.append(1000 * (first_lost - window.blocked))
        unblock_ms.append(1000 * (first_back - window.unblocked))
        # datagrams sent after egress-block returned and before egress-unblock started, yet received
        leaked += sum(1 for sent in received.values() if window.blocked < sent < window.unblock_started)
    return {
        "tries": len(windows),
        "send_period_ms": 1000 * SEND_PERIOD,
        "block_return_to_first_drop_ms": {
            "p50": percentile(block_ms, 0.5),
            "p99": percentile(block_ms, 0.99),
            "max": max(block_ms),
        },
        "datagrams_passed_after_block_returned": leaked,
        "unblock_return_to_passing_ms": {
            "p50": percentile(unblock_ms, 0.5),
            "p99": percentile(unblock_ms, 0.99),
        }
        if unblock_ms
        else None,
        "egress_block_command_seconds": summary(command_seconds),
    }


def latencies(env: Environment, settings: Settings) -> dict[str, Any]:
    result = {"attach": attach_latency(env, settings), "block": block_latency(env, settings)}
    write_result("latency", result)
    return result
