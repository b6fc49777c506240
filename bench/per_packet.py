"""Per-packet cost of our program next to a trivial one, over 1 flow and over 1,000.

A sender in the client container sends 64-byte UDP datagrams round-robin over `flows`
destination ports (one flow each); each case runs it once with the trivial program on the
veth and once with ours, in the same round, so the ratio is free of the machine's speed.
The datagrams carry TTL 1: the host drops them at its forwarding step, before conntrack
keeps an entry, so 100,000 flows leave nothing behind and need no receiver; the program on
the veth has run for each of them by then.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any, Protocol

from bench.bpf_stats import STATS_SYSCTL, attached_program_id, cost, program_counters, statistics_enabled
from bench.common import Settings, progress, spread
from bench.environment import HOST_PYTHON, UPSTREAM_SERVER, netns_exec

FIRST_PORT = 20000  # destination ports FIRST_PORT.. (nothing listens: the datagrams never arrive)
FIRST_SOURCE_PORT = 41000
SENDER_CPU = "0"  # as iperf3 -A 0: the sending CPU runs the veth, the program and the forwarding
SENDER_SECONDS = 30.0  # upper bound of one sender run

# Run by the host's Python inside a container's netns. Sends `rounds` rounds, one datagram
# per (socket, every-th port) each, a round every `period` seconds (0: back to back);
# bounded in count and in time. Prints how many datagrams the kernel took.
FLOW_SENDER = r"""
import socket, sys, time
dst, first_port, ports, sockets, source_port, every, rounds, period, seconds = sys.argv[1:10]
first_port, ports, sockets, every, rounds = map(int, (first_port, ports, sockets, every, rounds))
period, seconds, source_port = float(period), float(seconds), int(source_port)
senders = []
for n in range(sockets):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
    s.bind(("0.0.0.0", source_port + n))
    senders.append(s)
targets = [(dst, first_port + p) for p in range(0, ports, every)]
payload, sent, start = bytes(64), 0, time.monotonic()
for round_number in range(rounds):
    if time.monotonic() - start > seconds:
        break
    for s in senders:
        for target in targets:
            try:
                s.sendto(payload, target)
            except OSError:
                continue
            sent += 1
    if period:
        time.sleep(max(0.0, start + (round_number + 1) * period - time.monotonic()))
print(sent)
"""


def sender_command(
    pid: int,
    ports: int,
    rounds: int,
    sockets: int = 1,
    every: int = 1,
    period: float = 0.0,
    seconds: float = SENDER_SECONDS,
) -> list[str]:
    """The flow sender in the netns of process `pid`: sockets x ports / every flows."""
    arguments = (UPSTREAM_SERVER, FIRST_PORT, ports, sockets, FIRST_SOURCE_PORT, every, rounds, period)
    return [
        *netns_exec(pid),
        "taskset",
        "-c",
        SENDER_CPU,
        HOST_PYTHON,
        "-c",
        FLOW_SENDER,
        *map(str, arguments),
        str(seconds),
    ]


def send(pid: int, ports: int, rounds: int) -> int:
    """Datagrams sent, once the sender is done."""
    command = sender_command(pid, ports, rounds)
    return int(subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout)


class OnTheVeth(Protocol):
    """A throughput scenario that puts a program on the client's veth."""

    def setup(self) -> None: ...

    def teardown(self) -> None: ...


CASES = (  # name, flows, which of ours
    ("counting, 1 flow", 1, "counting"),
    ("counting, 1,000 flows", 1_000, "counting"),
    ("counting + rules, 1,000 flows", 1_000, "rules"),
)


def _measure(program: OnTheVeth, ifindex: int, pid: int, flows: int, datagrams: int) -> dict[str, Any]:
    program.setup()
    try:
        program_id = attached_program_id(ifindex)
        before, started = program_counters(program_id), time.monotonic()
        sent = send(pid, flows, max(1, datagrams // flows))
        seconds, after = time.monotonic() - started, program_counters(program_id)
    finally:
        program.teardown()
    measured = cost(before, after, seconds)
    if not measured["runs"]:
        raise RuntimeError(f"the program on ifindex {ifindex} never ran: the datagrams went elsewhere")
    return measured | {"datagrams_sent": sent}


def per_packet_cost(
    programs: dict[str, OnTheVeth], ifindex: int, pid: int, settings: Settings, rules: int
) -> dict[str, Any]:
    """Every case, `settings.repetitions` rounds, the trivial program, the floors and ours in
    turn. `programs`: "trivial", "floor" (one counter slot per flow, found by its port),
    "hashed floor" (found by a hash of it), "counting" and "rules" (ours with `rules`
    non-matching rules)."""
    samples: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in CASES}
    stats_before = STATS_SYSCTL.read_text().strip()
    with statistics_enabled():
        for round_number in range(settings.repetitions):
            for name, flows, ours in CASES:
                samples[name].append(
                    {
                        role: _measure(programs[program], ifindex, pid, flows, settings.per_packet_datagrams)
                        for role, program in (
                            ("trivial", "trivial"),
                            ("floor", "floor"),
                            ("hashed_floor", "hashed floor"),
                            ("ours", ours),
                        )
                    }
                )
            progress(f"per-packet cost round {round_number + 1}/{settings.repetitions}")
    cases = []
    for name, flows, ours in CASES:
        rounds = samples[name]
        trivial_ns = [r["trivial"]["ns_per_run"] for r in rounds]
        ours_ns = [r["ours"]["ns_per_run"] for r in rounds]
        floor_ns = [r["floor"]["ns_per_run"] for r in rounds]
        hashed_ns = [r["hashed_floor"]["ns_per_run"] for r in rounds]
        hashed_ratios = [h / t for h, t in zip(hashed_ns, trivial_ns, strict=True)]
        cases.append(
            {
                "case": name,
                "flows": flows,
                "rules": rules if ours == "rules" else 0,
                "trivial_ns_per_packet": spread(trivial_ns),
                "ns_per_packet": spread(ours_ns),
                "ratio_to_trivial": spread([o / t for o, t in zip(ours_ns, trivial_ns, strict=True)]),
                "floor_ns_per_packet": spread(floor_ns),
                "floor_ratio_to_trivial": spread([f / t for f, t in zip(floor_ns, trivial_ns, strict=True)]),
                "hashed_floor_ns_per_packet": spread(hashed_ns),
                "hashed_floor_ratio_to_trivial": spread(hashed_ratios),
                "rounds": rounds,
            }
        )
    return {
        "datagrams_per_run": settings.per_packet_datagrams,
        "datagram_payload_bytes": 64,
        "repetitions": settings.repetitions,
        "cases": cases,
        "bpf_stats_enabled": {"before": stats_before, "after": STATS_SYSCTL.read_text().strip()},
    }
