"""Control-plane cost: reading and aggregating the flow table (the agent's own cost:
bench/agent_cost.py; start-up times: bench/startup.py)."""

from __future__ import annotations

import ctypes
import ipaddress
import time
from pathlib import Path
from typing import Any

import numpy as np
from bcc.libbcc import lib

from agent.datapath import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE, Maps, open_datapath
from agent.datapath.percpu import possible_cpus
from agent.flows import FlowAggregator, TableRead
from agent.model import Container, Endpoint, Inventory
from bench.common import Results, Settings, progress, spread

SYNTHETIC_CONTAINERS = 200
MOVING_FRACTIONS = {"1%": 100, "100%": 1}  # label -> every n-th flow moves each refresh
FLOW_DESTINATIONS = ipaddress.IPv4Network("100.64.0.0/10")  # only written into the map: no packet


# --- synthetic flow tables ------------------------------------------------------------


def synthetic_flows(count: int, ifindexes: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """`count` distinct TCP flows spread over the veths, each to its own destination."""
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    stats = np.zeros(count, FLOW_STATS_DTYPE)
    rows = np.arange(count, dtype=np.uint64)
    keys["ifindex"] = np.asarray(ifindexes, np.uint32)[rows % len(ifindexes)]
    keys["family"] = 4
    keys["proto"] = 6
    keys["src_port"] = 32768 + rows % 28000
    keys["dst_port"] = 443
    source = np.zeros((count, 16), np.uint8)
    source[:, :4] = (10, 219, 0, 2)
    keys["src_addr"] = source.view("V16").ravel()
    destination = np.zeros((count, 16), np.uint8)
    addresses = (int(FLOW_DESTINATIONS.network_address) + rows).astype(">u4")
    destination[:, :4] = addresses.view(np.uint8).reshape(count, 4)
    keys["dst_addr"] = destination.view("V16").ravel()
    now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    stats["bytes"] = 1500 * 10
    stats["packets"] = 10
    stats["first_seen_ns"] = now - 60 * 10**9
    stats["last_seen_ns"] = now - 30 * 10**9  # idle until a refresh moves it
    return keys, stats


def fill(maps: Maps, keys: np.ndarray, stats: np.ndarray) -> None:
    """BPF_MAP_UPDATE_BATCH straight from the numpy arrays. A per-CPU table takes one copy
    per possible CPU: the flow goes in CPU 0's, the others stay empty (as if one CPU saw it)."""
    count = ctypes.c_uint32(len(keys))
    if maps.flows.percpu:
        copies = np.zeros((len(stats), possible_cpus()), stats.dtype)
        copies[:, 0] = stats
        stats = copies
    keys, stats = np.ascontiguousarray(keys), np.ascontiguousarray(stats)
    if lib.bpf_update_batch(maps.flows.fd, keys.ctypes.data, stats.ctypes.data, ctypes.byref(count)) != 0:
        raise OSError(ctypes.get_errno(), "BPF_MAP_UPDATE_BATCH on the flow table")


def synthetic_inventory(count: int = SYNTHETIC_CONTAINERS) -> tuple[Inventory, list[int]]:
    ifindexes = list(range(100_000, 100_000 + count))
    containers = tuple(
        Container(
            id=f"{n:064x}",
            name=f"bench-{n}",
            image="bench",
            endpoints=(Endpoint(ifindex, f"veth{n}", "net", "br", f"10.219.{n // 250}.{n % 250 + 2}"),),
        )
        for n, ifindex in enumerate(ifindexes)
    )
    return Inventory(containers=containers), ifindexes


def move(stats: np.ndarray, every: int, now_ns: int) -> None:
    """What the datapath does to the flows that carried packets since the last read."""
    stats["bytes"][::every] += 1500
    stats["packets"][::every] += 1
    stats["last_seen_ns"][::every] = now_ns


def read_and_aggregate(settings: Settings, results: Results) -> Path:
    """Maps.read_flows and FlowAggregator.update (200 containers) at each table size, with
    1% of the flows moving between refreshes, and with all of them moving (worst case)."""
    inventory, ifindexes = synthetic_inventory()
    levels: dict[str, Any] = {}
    for count in settings.flow_counts:
        # LRU headroom: the map evicts before it is completely full
        with open_datapath(flow_table_size=2 * count) as datapath:
            keys, stats = synthetic_flows(count, ifindexes)
            started = time.perf_counter()
            fill(datapath, keys, stats)
            fill_seconds = time.perf_counter() - started
            levels[str(count)] = {"fill_seconds": fill_seconds}
            for label, every in MOVING_FRACTIONS.items():
                levels[str(count)][label] = _refreshes(
                    datapath, inventory, every, settings.refresh_repetitions
                )
            progress(
                f"read+aggregate {count:,} flows: {levels[str(count)]['1%']['refresh_ms']['median']:.0f} ms"
            )
    result = {
        "containers": SYNTHETIC_CONTAINERS,
        "moving_fractions": list(MOVING_FRACTIONS),
        "repetitions": settings.refresh_repetitions,
        "levels": levels,
    }
    return results.write("read_and_aggregate", result)


def _refreshes(datapath: Maps, inventory: Inventory, every: int, repetitions: int) -> dict[str, Any]:
    aggregator = FlowAggregator()
    reads, aggregations = [], []
    for _ in range(repetitions + 1):  # the first aggregation is the baseline: not counted
        started = time.perf_counter()
        read = datapath.read_flows()
        reads.append(time.perf_counter() - started)
        stats = read.stats.copy()
        move(stats, every, read.monotonic_ns)
        table = TableRead(
            read.keys, stats, read.monotonic_ns, datapath.flow_table_size, len(read.keys), {}, read.started_ns
        )
        started = time.perf_counter()
        aggregator.update(table, inventory)
        aggregations.append(time.perf_counter() - started)
    flows = len(read.keys)
    return {
        "flows_read": flows,
        "read_ms": spread([1000 * t for t in reads[1:]]),
        "aggregate_ms": spread([1000 * t for t in aggregations[1:]]),
        "refresh_ms": spread([1000 * (r + a) for r, a in zip(reads[1:], aggregations[1:], strict=True)]),
    }
