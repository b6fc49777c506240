"""What every benchmark shares: settings, statistics, result files, the machine lock."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
    udp_ab_rounds: int  # alternating 1 s UDP 64 B rounds: no program, control, trivial, ours
    flow_counts: tuple[int, ...]
    refresh_repetitions: int
    agent_containers: int
    agent_flows: int
    agent_seconds: float
    per_packet_datagrams: int  # one sender run of the per-packet cost
    attach_tries: int  # container starts: >= 300 to tell 99% from 100%
    block_tries: int
    cold_starts: int


# One row a setting, one column a profile: what quick and smoke change is read across.
PROFILE_NAMES = ("full", "quick", "smoke")
PROFILE_VALUES: dict[str, tuple[Any, Any, Any]] = {
    "repetitions": (5, 3, 1),
    "seconds": (2, 1, 1),
    # smoke keeps the full run's rule count: the regression check compares like with like
    "rule_counts": ((0, 100, 1_000, 10_000, 100_000), (0, 10_000), (0, 10_000)),
    "cost_rules": (10_000, 10_000, 10_000),
    "udp_ab_rounds": (50, 8, 3),  # 50: the median of paired ratios to about a point (IQR ~10 points)
    "flow_counts": ((1_000, 10_000, 100_000, 1_000_000), (10_000, 100_000), (1_000,)),
    "refresh_repetitions": (5, 3, 1),
    "agent_containers": (200, 10, 2),
    "agent_flows": (100_000, 100_000, 1_000),
    "agent_seconds": (30.0, 3.0, 2.0),
    "per_packet_datagrams": (300_000, 200_000, 50_000),
    "attach_tries": (300, 4, 2),
    "block_tries": (50, 4, 2),
    "cold_starts": (5, 1, 1),
}
PROFILES = {
    name: Settings(name=name, **{field: values[column] for field, values in PROFILE_VALUES.items()})
    for column, name in enumerate(PROFILE_NAMES)
}
FULL, QUICK, SMOKE = (PROFILES[name] for name in PROFILE_NAMES)


# --- statistics -------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict[str, float]:
    """Median, quartiles (p25-p75: the middle half) and min-max: what every figure is
    reported with."""
    quartiles = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else [values[0]] * 3
    return {
        "median": statistics.median(values),
        "p25": quartiles[0],
        "p75": quartiles[2],
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


def wait_until(condition: Callable[[], object], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


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
