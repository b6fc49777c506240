"""The agent's own process_* series, read from /proc/self as prometheus_client's
ProcessCollector reads them (same names, HELP, types and values), without that package."""

from __future__ import annotations

import os
from pathlib import Path

from agent.metrics_text import Family, counter, gauge


class ProcessMetrics:
    def __init__(self, proc: Path = Path("/proc")):
        self._proc = proc
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._page_size = os.sysconf("SC_PAGE_SIZE")
        self._boot_time = _boot_time(proc)  # None: no /proc, so no series (as ProcessCollector)

    def collect(self) -> list[Family]:
        if self._boot_time is None:
            return []
        own = self._proc / "self"
        families = []
        try:
            # the fields after the command name, which may itself hold spaces and parentheses
            fields = (own / "stat").read_bytes().rsplit(b")", 1)[-1].split()
        except OSError:
            pass
        else:
            families += [
                gauge("process_virtual_memory_bytes", "Virtual memory size in bytes.", float(fields[20])),
                gauge(
                    "process_resident_memory_bytes",
                    "Resident memory size in bytes.",
                    float(fields[21]) * self._page_size,
                ),
                gauge(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    float(fields[19]) / self._ticks + self._boot_time,
                ),
                counter(
                    "process_cpu_seconds",
                    "Total user and system CPU time spent in seconds.",
                    float(fields[11]) / self._ticks + float(fields[12]) / self._ticks,
                ),
            ]
        try:
            max_fds = _max_open_files(own / "limits")
            open_fds = len(os.listdir(own / "fd"))
        except OSError:
            return families
        families.append(gauge("process_open_fds", "Number of open file descriptors.", float(open_fds)))
        if max_fds is not None:
            families.append(gauge("process_max_fds", "Maximum number of open file descriptors.", max_fds))
        return families


def _boot_time(proc: Path) -> float | None:
    try:
        with open(proc / "stat", "rb") as stat:
            for line in stat:
                if line.startswith(b"btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _max_open_files(limits: Path) -> float | None:
    """The soft limit: "Max open files  1024  4096  files"."""
    with open(limits, "rb") as text:
        for line in text:
            if line.startswith(b"Max open file"):
                return float(line.split()[3])
    return None
