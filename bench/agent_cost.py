"""The agent at work: `egress-agent run -i 1` (a refresh every second) beside real sleeping
containers, its CPU and memory sampled every second for the whole run, in two phases:

- idle: an empty flow table;
- real: `agent_flows` flows created by real UDP datagrams from the containers (the
  datapath's own entries, timestamps and moved-flow announcements), 1% of them sent again
  each second by real datagrams.

Nothing is written into the agent's maps by the bench: a flow the datapath did not create
costs the agent differently (it never announces a move), so it would measure something else.

Beside the real phase runs the wake control (bench/wake_cost.py): a fixed piece of work timed
back to back and once a second, which tells what this machine charges any process for
waking once a second, apart from what the agent does.

`python -m bench --only agent` runs this alone (bench/results/agent_cost.json, agent_cost.png).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.datapath import DEFAULT_FLOW_TABLE_SIZE, Maps, our_filters
from bench.agent_process import AgentFailed, AgentProcess, start_agent
from bench.common import Results, Settings, progress, spread, wait_until
from bench.environment import UPSTREAM_SERVER, Environment
from bench.per_packet import sender_command
from bench.plots import plot_agent

CONTAINER_START_BUDGET = 150.0  # seconds: fewer containers rather than a bench run of an hour
REAL_SENDERS = 10  # containers the real flows come from
PORTS_PER_SOCKET = 50_000
MOVING_EVERY = 100  # 1% of the flows move each second
FLOW_SHARE_DIVISOR = 8  # a veth's default new flows per epoch: the table size / 8 (bpf/egress.c)
SETTLE_SECONDS = 3.0  # before a phase: past start-up, past the first refreshes of a new table


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime + stime, in USER_HZ ticks


def memory_mb(pid: int) -> dict[str, float]:
    wanted = {"VmRSS", "RssAnon", "RssFile"}
    memory = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in wanted:
            memory[name] = int(value.split()[0]) / 1024
    return memory


class Sampler(threading.Thread):
    """The agent's CPU time and memory once a second, from its start to its stop; phases
    are named spans of that one time series."""

    def __init__(self, agent: AgentProcess):
        super().__init__(daemon=True)
        self.agent, self.pid = agent, agent.pid
        self.started = time.monotonic()
        self.samples: list[dict[str, float]] = []
        self.phases: dict[str, tuple[float, float]] = {}
        self.stopping = threading.Event()

    def sample(self) -> dict[str, float]:
        self.agent.check_alive()  # a dead agent's /proc entry holds no memory figures
        taken = {"t": time.monotonic() - self.started, "cpu_seconds": cpu_seconds(self.pid)}
        taken |= {f"{name}_mb": value for name, value in memory_mb(self.pid).items()}
        self.samples.append(taken)
        return taken

    def run(self) -> None:
        while not self.stopping.is_set() and self.agent.proc.poll() is None:
            with contextlib.suppress(AgentFailed, OSError):  # phase() reports a dead agent
                self.sample()
            self.stopping.wait(1.0)

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def phase(self, name: str, seconds: float) -> dict[str, Any]:
        """Sleep through a phase of `seconds`; what the agent used over it."""
        first = self.sample()
        time.sleep(seconds)
        last = self.sample()
        self.phases[name] = (first["t"], last["t"])
        inside = [s for s in self.samples if first["t"] <= s["t"] <= last["t"]]
        cpu = (last["cpu_seconds"] - first["cpu_seconds"]) / (last["t"] - first["t"])
        return {
            "seconds": round(last["t"] - first["t"], 1),
            "cpu_percent_of_one_core": 100 * cpu,
            **{name: spread([s[name] for s in inside]) for name in ("VmRSS_mb", "RssAnon_mb", "RssFile_mb")},
        }

    def series(self) -> list[dict[str, float]]:
        """Per second: CPU % of one core since the previous sample, and memory."""
        ordered = sorted(self.samples, key=lambda s: s["t"])
        return [
            {
                "t": round(now["t"], 2),
                "cpu_percent": 100 * (now["cpu_seconds"] - before["cpu_seconds"]) / (now["t"] - before["t"]),
                **{k: v for k, v in now.items() if k.endswith("_mb")},
            }
            for before, now in itertools.pairwise(ordered)
            if now["t"] - before["t"] > 0.5  # a phase boundary's extra sample: too short for a rate
        ]


def start_containers(env: Environment, wanted: int) -> tuple[list[Any], float]:
    """As many of `wanted` sleeping containers as start within the budget."""
    started = time.monotonic()
    containers: list[Any] = []
    while len(containers) < wanted and time.monotonic() - started < CONTAINER_START_BUDGET:
        batch = min(20, wanted - len(containers))
        containers += env.containers(f"agent{len(containers):03d}-", batch)
    return containers, time.monotonic() - started


@dataclass(frozen=True)
class RealFlows:
    """`flows` flows from up to REAL_SENDERS containers: sockets x ports each."""

    pids: list[int]
    flows: int
    share: int  # new flows a veth may create per epoch (bpf/egress.c): past it, its overflow entry

    @property
    def per_sender(self) -> int:
        return max(1, self.flows // len(self.pids))

    @property
    def sockets(self) -> int:
        return -(-self.per_sender // PORTS_PER_SOCKET)

    @property
    def ports(self) -> int:
        return -(-self.per_sender // self.sockets)

    @property
    def created(self) -> int:
        return len(self.pids) * self.sockets * self.ports

    @property
    def moving(self) -> int:
        """Flows keep_moving() sends a datagram on each second."""
        return len(self.pids) * self.sockets * -(-self.ports // MOVING_EVERY)

    def create(self) -> None:
        if self.per_sender > self.share:  # the noisy-neighbour guard would take the rest
            raise RuntimeError(f"{self.per_sender} flows per container exceed the flow share {self.share}")
        for pid in self.pids:
            command = sender_command(pid, self.ports, 1, self.sockets)
            subprocess.run(command, check=True, capture_output=True, timeout=120)

    def keep_moving(self, seconds: float) -> list[subprocess.Popen[bytes]]:
        """Every MOVING_EVERY-th flow gets one datagram each second, for `seconds`."""
        rounds = int(seconds) + 1
        return [
            subprocess.Popen(
                sender_command(pid, self.ports, rounds, self.sockets, MOVING_EVERY, 1.0, seconds + 5),
                stdout=subprocess.DEVNULL,
            )
            for pid in self.pids
        ]


def start_wake_control(seconds: float) -> subprocess.Popen[str]:
    """bench/wake_cost.py in the agent's interpreter, waking once a second for `seconds`."""
    return subprocess.Popen(
        [sys.executable, "-m", "bench.wake_cost", str(max(2, int(seconds) - 1))],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )


def flows_to_upstream(maps: Maps) -> int:
    keys = maps.read_flows().keys
    upstream = bytes(int(part) for part in UPSTREAM_SERVER.split(".")).ljust(16, b"\0")
    return int((keys["dst_addr"].view("S16") == upstream).sum())


def agent_cost(env: Environment, settings: Settings, results: Results) -> Path:
    containers, start_seconds = start_containers(env, settings.agent_containers)
    progress(f"agent: {len(containers)} containers started in {start_seconds:.0f} s")
    veths = list(env.veth_ifindexes(containers).values())
    # LRU headroom (the map evicts before it is full), and room for each real sender's flows
    table_size = max(2 * settings.agent_flows, DEFAULT_FLOW_TABLE_SIZE)
    agent = start_agent("-i", "1", "--flow-table-size", str(table_size))
    env.teardown.add("egress-agent", agent.stop)
    sampler = Sampler(agent)
    sampler.start()
    movers: list[subprocess.Popen[bytes]] = []
    maps = Maps()
    try:
        wait_until(lambda: set(veths) <= set(our_filters()), 60, "the agent to attach to every container")
        time.sleep(SETTLE_SECONDS)
        idle = sampler.phase("idle", settings.agent_seconds / 3)

        senders = [env.pid(c) for c in containers[:REAL_SENDERS]]
        real = RealFlows(senders, settings.agent_flows, share=table_size // FLOW_SHARE_DIVISOR)
        real.create()
        real_in_table = flows_to_upstream(maps)
        movers = real.keep_moving(SETTLE_SECONDS + settings.agent_seconds)
        time.sleep(SETTLE_SECONDS)
        control = start_wake_control(settings.agent_seconds)
        real_phase = sampler.phase("real", settings.agent_seconds)
        wake_control = json.loads(control.communicate(timeout=60)[0])
    finally:
        for process in movers:
            process.kill()
            process.wait()
        maps.close()
        sampler.stop()
        agent.stop(timeout=60)
    env.remove_containers()
    result = {
        "containers": len(containers),
        "containers_wanted": settings.agent_containers,
        "container_start_seconds": start_seconds,
        "flows_moving_per_second": real.moving,
        "flow_table_size": table_size,
        "real_flows": {"created": real.created, "in_table": real_in_table, "senders": len(real.pids)},
        "idle": idle,
        "real": real_phase,
        "wake_control": wake_control,
        "phases": sampler.phases,
        "series": sampler.series(),
        "command": f"egress-agent run -i 1 --flow-table-size {table_size}",
    }
    path = results.write("agent_cost", result)
    plot_agent(result, results.directory)
    return path
