"""What every benchmark shares: the lab environment, statistics, result files.

The environment is the test lab (tests/lab.py): an `upstream` netns behind a veth
with unreachable routes for the test prefixes installed first, Docker networks and
containers of our own, all removed at the end. Nothing is sent anywhere else.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
from lab import Lab, Upstream, install_safety_routes, remove_safety_routes

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"  # python -m bench --results DIR writes elsewhere
# One user of tc, netns and iperf3 at a time: the system tests take the same lock. The
# suite's own smoke run of the bench, already holding it, names another.
MACHINE_LOCK = Path(os.environ.get("EGRESS_TOP_BENCH_LOCK", "/tmp/ett-machine.lock"))


@dataclass(frozen=True)
class Settings:
    repetitions: int
    scaling_repetitions: int  # 4 scenarios x 5 rule counts: fewer, or the run takes an hour
    seconds: float  # one throughput run (iperf3 takes whole seconds)
    tries: int  # latency tries
    rule_counts: tuple[int, ...]
    flow_counts: tuple[int, ...]
    agent_containers: int
    agent_seconds: float


FULL = Settings(
    5, 3, 3.0, 50, (0, 100, 1_000, 10_000, 100_000), (1_000, 10_000, 100_000, 1_000_000), 200, 30.0
)
QUICK = Settings(2, 2, 1.0, 10, (0, 1_000, 10_000), (1_000, 100_000), 10, 10.0)
SMOKE = Settings(1, 1, 1.0, 2, (0, 10), (1_000,), 2, 3.0)


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def results_dir() -> Path:
    return Path(os.environ.get("EGRESS_TOP_BENCH_RESULTS", RESULTS))


def write_result(name: str, data: dict[str, Any]) -> Path:
    results_dir().mkdir(parents=True, exist_ok=True)
    path = results_dir() / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return path


@dataclass
class Environment:
    client: docker.DockerClient
    upstream: Upstream
    lab: Lab


@contextlib.contextmanager
def environment() -> Iterator[Environment]:
    """The machine to ourselves (the tests' lock), a private rule store, the lab, and
    afterwards nothing of ours left: containers, netns, routes, filters, pins."""
    from agent.datapath import cleanup_everything

    with open(MACHINE_LOCK, "w") as lock, tempfile.TemporaryDirectory(prefix="ettb-state-") as state:
        fcntl.flock(lock, fcntl.LOCK_EX)
        os.environ["EGRESS_TOP_STATE_DIR"] = state
        client = docker.from_env(timeout=120)
        safety = install_safety_routes()
        upstream = Upstream()
        lab = Lab(client)
        try:
            upstream.create()
            yield Environment(client, upstream, lab)
        finally:
            lab.destroy()
            upstream.destroy()
            cleanup_everything()
            remove_safety_routes(safety)
