"""What every benchmark shares: settings, statistics, result files, the machine lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
BIN = REPO / ".venv" / "bin"
DEFAULT_RESULTS = REPO / "bench" / "results"
README = REPO / "README.md"  # its benchmark figures are rewritten by a run into DEFAULT_RESULTS
# One user of tc, netns, Docker and iperf3 at a time: the system tests take the same lock.
MACHINE_LOCK = Path("/tmp/ett-machine.lock")


@dataclass(frozen=True)
class Settings:
    name: str
    repetitions: int  # interleaved rounds of every throughput scenario
    seconds: int  # one iperf3 run (iperf3 counts whole seconds)
    rule_counts: tuple[int, ...]  # for the scaling curve; the datapath-cost rule count is among them
    cost_rules: int  # (c), (d), (e) of the datapath cost
    flow_counts: tuple[int, ...]
    refresh_repetitions: int
    agent_containers: int
    agent_flows: int
    agent_seconds: float
    per_packet_datagrams: int  # one sender run of the per-packet cost
    attach_tries: int  # container starts: >= 300 to tell 99% from 100%
    block_tries: int
    cold_starts: int


FULL = Settings(
    name="full",
    repetitions=5,
    seconds=2,
    rule_counts=(0, 100, 1_000, 10_000, 100_000),
    cost_rules=10_000,
    flow_counts=(1_000, 10_000, 100_000, 1_000_000),
    refresh_repetitions=5,
    agent_containers=200,
    agent_flows=100_000,
    agent_seconds=30.0,
    per_packet_datagrams=300_000,
    attach_tries=300,
    block_tries=50,
    cold_starts=5,
)
QUICK = Settings(
    name="quick",
    repetitions=3,
    seconds=1,
    rule_counts=(0, 10_000),
    cost_rules=10_000,
    flow_counts=(10_000, 100_000),
    refresh_repetitions=3,
    agent_containers=10,
    agent_flows=100_000,
    agent_seconds=3.0,
    per_packet_datagrams=200_000,
    attach_tries=4,
    block_tries=4,
    cold_starts=1,
)
SMOKE = Settings(
    name="smoke",
    repetitions=1,
    seconds=1,
    rule_counts=(0, 10_000),  # the full run's rule count: the regression check compares like with like
    cost_rules=10_000,
    flow_counts=(1_000,),
    refresh_repetitions=1,
    agent_containers=2,
    agent_flows=1_000,
    agent_seconds=2.0,
    per_packet_datagrams=50_000,
    attach_tries=2,
    block_tries=2,
    cold_starts=1,
)
PROFILES = {s.name: s for s in (FULL, QUICK, SMOKE)}


def settings_dict(settings: Settings) -> dict[str, Any]:
    return asdict(settings)


# --- statistics -------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median and min-max: what every figure is reported with."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile: with 50 values, p99 is the largest but none."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def latency_summary(values_ms: Sequence[float]) -> dict[str, float]:
    return {
        "p50": percentile(values_ms, 0.5),
        "p99": percentile(values_ms, 0.99),
        "min": min(values_ms),
        "max": max(values_ms),
        "n": len(values_ms),
    }


# --- result files -------------------------------------------------------------------------


class Results:
    """bench/results/ (or --results DIR): one JSON file per benchmark, each stamped with
    the run it came from (a run with --only leaves the other files as they were)."""

    def __init__(self, directory: Path, run: dict[str, Any] | None = None):
        self.directory = directory
        self.run = run or {}
        directory.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, data: dict[str, Any]) -> Path:
        path = self.directory / f"{name}.json"
        path.write_text(json.dumps({**data, "run": self.run}, indent=2, sort_keys=True) + "\n")
        return path

    def load(self, name: str) -> dict[str, Any] | None:
        path = self.directory / f"{name}.json"
        return json.loads(path.read_text()) if path.exists() else None


def progress(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# --- the machine lock ---------------------------------------------------------------------


def _ancestors() -> set[int]:
    pids, pid = set(), os.getppid()
    while pid > 1:
        pids.add(pid)
        stat = Path(f"/proc/{pid}/stat").read_text()
        pid = int(stat.rsplit(")", 1)[1].split()[1])
    return pids


def _lock_holders(path: Path) -> set[int]:
    """Pids holding a flock on path, from /proc/locks ("MAJ:MIN:INODE" identifies the file)."""
    info = path.stat()
    file_id = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    holders = set()
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == file_id:
            holders.add(int(fields[4]))
    return holders


@contextlib.contextmanager
def machine_lock(path: Path = MACHINE_LOCK) -> Iterator[None]:
    """Hold the machine lock for the whole run. Already held by a process we run under
    (`flock /tmp/ett-machine.lock python -m bench`, or the test session running the
    smoke test), it is ours already: taking it again would wait for ourselves forever."""
    path.touch(exist_ok=True)
    if _lock_holders(path) & _ancestors():
        yield
        return
    with open(path, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for {path} (another test or benchmark run holds it)")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
