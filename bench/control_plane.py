"""Control-plane cost: reading and aggregating the flow table, the agent's CPU and
memory while it refreshes, and egress-top's cold start."""

from __future__ import annotations

import ctypes
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bcc.libbcc import lib
from lab import wait_until
from runner import veth_ifindexes

from agent.datapath import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE, Maps, open_datapath, our_filters
from agent.flows import FlowAggregator, TableRead
from agent.model import Container, Endpoint, Inventory
from bench.common import REPO, Environment, Settings, summary, write_result

BIN = REPO / ".venv" / "bin"
SYNTHETIC_CONTAINERS = 200


def synthetic_flows(count: int, ifindexes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct flows spread over the given veths."""
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    stats = np.zeros(count, FLOW_STATS_DTYPE)
    rows = np.arange(count)
    keys["ifindex"] = np.asarray(ifindexes)[rows % len(ifindexes)]
    keys["family"] = 4
    keys["proto"] = 6
    keys["src_port"] = rows % 65536
    keys["dst_port"] = rows // 65536 + 1
    stats["bytes"] = 1000
    stats["packets"] = 10
    return keys, stats


def fill(maps: Maps, keys: np.ndarray, stats: np.ndarray) -> None:
    count = ctypes.c_uint32(len(keys))
    if lib.bpf_update_batch(maps.flows.fd, keys.ctypes.data, stats.ctypes.data, ctypes.byref(count)) != 0:
        raise OSError(ctypes.get_errno(), "BPF_MAP_UPDATE_BATCH")


def synthetic_inventory() -> tuple[Inventory, list[int]]:
    ifindexes = list(range(100_000, 100_000 + SYNTHETIC_CONTAINERS))
    containers = tuple(
        Container(
            id=f"{n:064x}",
            name=f"c{n}",
            image="bench",
            endpoints=(Endpoint(ifindex, f"veth{n}", "net", "br", f"10.9.{n // 250}.{n % 250 + 1}"),),
        )
        for n, ifindex in enumerate(ifindexes)
    )
    return Inventory(containers=containers), ifindexes


def read_and_aggregate(settings: Settings) -> dict[str, Any]:
    """Maps.read_flows and FlowAggregator.update at each table size; 1% of flows moved."""
    inventory, ifindexes = synthetic_inventory()
    levels = {}
    for count in settings.flow_counts:
        with open_datapath(flow_table_size=2 * count) as datapath:  # LRU headroom: no eviction while filling
            keys, stats = synthetic_flows(count, ifindexes)
            fill(datapath, keys, stats)
            reads, aggregations = [], []
            aggregator = FlowAggregator()
            for repetition in range(settings.repetitions + 1):
                started = time.perf_counter()
                read = datapath.read_flows()
                reads.append(time.perf_counter() - started)
                moved = read.stats.copy()
                moved["bytes"][::100] += 100 * (repetition + 1)
                moved["packets"][::100] += repetition + 1
                moved["last_seen_ns"][::100] = read.monotonic_ns  # as the datapath stamps a moving flow
                started = time.perf_counter()
                aggregator.update(
                    TableRead(
                        read.keys, moved, read.monotonic_ns, 2 * count, count, read_started_ns=read.started_ns
                    ),
                    inventory,
                )
                aggregations.append(time.perf_counter() - started)
            assert len(read.keys) == count, f"read {len(read.keys)} of {count} flows"
            # the first aggregation is the baseline (no deltas): not representative
            levels[str(count)] = {
                "read_ms": summary([1000 * t for t in reads]),
                "aggregate_ms": summary([1000 * t for t in aggregations[1:]]),
                "refresh_ms": summary(
                    [1000 * (r + a) for r, a in zip(reads[1:], aggregations[1:], strict=True)]
                ),
            }
    result = {"flows_moved_per_refresh": "1%", "containers": SYNTHETIC_CONTAINERS, "levels": levels}
    write_result("read_and_aggregate", result)
    return result


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, clock ticks


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def agent_cost(env: Environment, settings: Settings, flows: int = 100_000) -> dict[str, Any]:
    """egress-agent run -i 1 with real containers and `flows` flows, 1% of them moving each second."""
    net = env.lab.network()
    containers = [env.lab.container(f"ettb-agent{n}", network=net) for n in range(settings.agent_containers)]
    ifindexes = [i for c in containers for i in veth_ifindexes(env.lab.pid(c))]
    agent = subprocess.Popen(
        [str(BIN / "egress-agent"), "run", "-i", "1", "--flow-table-size", str(2 * flows)],
        stderr=subprocess.PIPE,
        text=True,
    )
    stop = threading.Event()
    try:
        wait_until(lambda: set(ifindexes) <= set(our_filters()), timeout=60)
        maps = Maps()
        keys, stats = synthetic_flows(flows, ifindexes)
        fill(maps, keys, stats)

        def move_one_percent() -> None:
            while not stop.wait(1.0):
                stats["bytes"][::100] += 1000
                stats["packets"][::100] += 1
                stats["last_seen_ns"][::100] = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
                fill(maps, keys[::100].copy(), stats[::100].copy())

        mover = threading.Thread(target=move_one_percent, daemon=True)
        mover.start()
        time.sleep(3)  # past start-up: measure the steady state
        cpu_before, wall_before = _cpu_seconds(agent.pid), time.monotonic()
        rss = []
        while time.monotonic() - wall_before < settings.agent_seconds:
            rss.append(_rss_mb(agent.pid))
            time.sleep(1)
        cpu = (_cpu_seconds(agent.pid) - cpu_before) / (time.monotonic() - wall_before)
        stop.set()
        mover.join()
        maps.close()
    finally:
        stop.set()
        agent.terminate()
        agent.wait(timeout=30)
    result = {
        "containers": len(containers),
        "flows": flows,
        "seconds": settings.agent_seconds,
        "cpu_percent_of_one_core": 100 * cpu,
        "rss_mb": {"median": statistics.median(rss), "max": max(rss)},
    }
    write_result("agent_cost", result)
    return result


def cold_start(settings: Settings) -> dict[str, Any]:
    """egress-top --json --count 1 -i 0.1 from nothing loaded: BCC compile included."""
    times = []
    for _ in range(max(settings.repetitions, 3)):
        started = time.perf_counter()
        subprocess.run(
            [str(BIN / "egress-top"), "--json", "--count", "1", "-i", "0.1"], check=True, capture_output=True
        )
        times.append(time.perf_counter() - started)
    result = {"seconds": summary(times), "note": "no compile cache: every start compiles with BCC"}
    write_result("cold_start", result)
    return result
