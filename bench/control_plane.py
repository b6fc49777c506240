"""Control-plane cost: reading and aggregating the flow table, the agent's CPU and memory
while it refreshes, and egress-top's cold start."""

from __future__ import annotations

import ctypes
import ipaddress
import statistics
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from bcc.libbcc import lib

from agent.datapath import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE, Maps, open_datapath, our_filters, pins_exist
from agent.flows import FlowAggregator, TableRead
from agent.model import Container, Endpoint, Inventory
from bench.common import BIN, Results, Settings, progress, spread
from bench.environment import Environment, refuse_if_busy

SYNTHETIC_CONTAINERS = 200
MOVING_FRACTIONS = {"1%": 100, "100%": 1}  # label -> every n-th flow moves each refresh
CONTAINER_START_BUDGET = 150.0  # seconds: fewer containers rather than a bench run of an hour
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
    """BPF_MAP_UPDATE_BATCH straight from the numpy arrays."""
    count = ctypes.c_uint32(len(keys))
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


# --- the agent at work -------------------------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in USER_HZ ticks


def _memory_mb(pid: int) -> dict[str, float]:
    wanted = {"VmRSS", "RssAnon", "RssFile"}
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in wanted:
            memory[name] = int(value.split()[0]) / 1024
    return memory


class AgentProcess:
    """`egress-agent run -i 1`, returned once it says it is ready."""

    def __init__(self, *extra: str, interval: float = 1.0):
        self.proc = subprocess.Popen(
            [str(BIN / "egress-agent"), "run", "-i", str(interval), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            if "ready" in line:
                break
        else:
            raise RuntimeError(f"egress-agent exited before it was ready (exit {self.proc.wait()})")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()  # keep draining it

    @property
    def pid(self) -> int:
        return self.proc.pid

    def usage(self, seconds: float) -> dict[str, Any]:
        """CPU (% of one core) over `seconds`, and memory sampled each second."""
        cpu_before, wall_before = _cpu_seconds(self.pid), time.monotonic()
        samples = []
        while time.monotonic() - wall_before < seconds:
            samples.append(_memory_mb(self.pid))
            time.sleep(1.0)
        cpu = (_cpu_seconds(self.pid) - cpu_before) / (time.monotonic() - wall_before)
        return {
            "seconds": seconds,
            "cpu_percent_of_one_core": 100 * cpu,
            **{f"{name}_mb": spread([s[name] for s in samples]) for name in samples[0]},
        }

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: a clean stop
            self.proc.wait(timeout=60)


def wait_until(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def start_containers(env: Environment, wanted: int) -> tuple[list[Any], float]:
    """As many of `wanted` sleeping containers as start within the budget."""
    started = time.monotonic()
    containers: list[Any] = []
    while len(containers) < wanted and time.monotonic() - started < CONTAINER_START_BUDGET:
        batch = min(20, wanted - len(containers))
        containers += env.containers(f"agent{len(containers):03d}-", batch)
    return containers, time.monotonic() - started


def agent_cost(env: Environment, settings: Settings, results: Results) -> Path:
    """egress-agent run -i 1 with real sleeping containers: first with an empty flow table,
    then with `agent_flows` flows written into its map and 1% of them moving each second."""
    containers, start_seconds = start_containers(env, settings.agent_containers)
    progress(f"agent: {len(containers)} containers started in {start_seconds:.0f} s")
    veths = list(env.veth_ifindexes(containers).values())
    flows = settings.agent_flows
    agent = AgentProcess("--flow-table-size", str(2 * flows))
    env.teardown.add("egress-agent", agent.stop)
    stop_moving = threading.Event()
    settle = min(3.0, settings.agent_seconds / 3)  # past start-up, past the first refreshes of a full table
    try:
        wait_until(lambda: set(veths) <= set(our_filters()), 60, "the agent to attach to every container")
        time.sleep(settle)
        idle = agent.usage(settings.agent_seconds / 3)
        maps = Maps()
        keys, stats = synthetic_flows(flows, veths)
        fill(maps, keys, stats)

        def move_one_percent() -> None:
            while not stop_moving.wait(1.0):
                move(stats, 100, time.clock_gettime_ns(time.CLOCK_MONOTONIC))
                fill(maps, keys[::100], stats[::100])

        mover = threading.Thread(target=move_one_percent, daemon=True)
        mover.start()
        time.sleep(settle)
        loaded = agent.usage(settings.agent_seconds)
        stop_moving.set()
        mover.join()
        flows_in_table = len(maps.read_flows().keys)
        maps.close()
    finally:
        stop_moving.set()
        agent.stop()
    env.remove_containers()
    result = {
        "containers": len(containers),
        "containers_wanted": settings.agent_containers,
        "container_start_seconds": start_seconds,
        "flows": flows_in_table,
        "flows_moving_per_second": flows // 100,
        "flow_table_size": 2 * flows,
        "idle": idle,
        "loaded": loaded,
        "command": f"egress-agent run -i 1 --flow-table-size {2 * flows}",
    }
    return results.write("agent_cost", result)


# --- cold start -------------------------------------------------------------------------

IMPORT_ONLY = "import agent.cli, bcc"
LOAD_ONLY = (
    "import time\n"
    "from agent.datapath import open_datapath\n"
    "started = time.perf_counter()\n"
    "with open_datapath():\n"
    "    print(time.perf_counter() - started)\n"
)


def _timed_run(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return time.perf_counter() - started, output


def cold_start(settings: Settings, results: Results) -> Path:
    """`egress-top --json --count 1 -i 0.1` with nothing of ours loaded or pinned, and where
    its time goes: interpreter + imports, and compiling + loading the program (BCC)."""
    python = str(BIN / "python")
    totals, imports, loads = [], [], []
    for _ in range(settings.cold_starts):
        refuse_if_busy()
        assert not pins_exist() and not our_filters(), "not a cold start: something of ours is loaded"
        totals.append(_timed_run([str(BIN / "egress-top"), "--json", "--count", "1", "-i", "0.1"])[0])
        imports.append(_timed_run([python, "-c", IMPORT_ONLY])[0])
        loads.append(float(_timed_run([python, "-c", LOAD_ONLY])[1]))
    result = {
        "command": "egress-top --json --count 1 -i 0.1",
        "seconds": spread(totals),
        "breakdown_seconds": {
            "python_and_imports": spread(imports),
            "compile_and_load_program": spread(loads),
            "rest_including_one_interval": statistics.median(totals)
            - statistics.median(imports)
            - statistics.median(loads),
        },
    }
    return results.write("cold_start", result)
