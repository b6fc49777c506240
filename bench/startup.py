"""Start-up: `egress-top --json --count 1 -i 0.1` with nothing of ours loaded (a cold start,
and where its time goes), twice over: with an empty compiled-program cache (the first cold
start on a kernel: BCC compiles) and with the cache the previous start filled (a later
cold start: the program loads without BCC); then beside a running agent (the datapath
loaded and pinned: the front end only opens the pins).

The cache is a directory of the bench's own (EGRESS_TOP_PROGRAM_CACHE, see
agent/datapath/program_cache.py), emptied before each first-compile run. A build without
the cache leaves it empty: the cached case is then reported as not measured, with why.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from agent.datapath import our_filters, pins_exist
from bench.agent_process import start_agent
from bench.common import BIN, Results, Settings, spread
from bench.environment import refuse_if_busy

FRONT_END = [str(BIN / "egress-top"), "--json", "--count", "1", "-i", "0.1"]
PROGRAM_CACHE_ENV = "EGRESS_TOP_PROGRAM_CACHE"  # agent/datapath/program_cache.py: CACHE_DIR_ENV
IMPORT_ONLY = "import agent.cli.top"  # egress-top's room (agent/cli/top.py)
LOAD_ONLY = (
    "import time\n"
    "from agent.datapath import open_datapath\n"
    "started = time.perf_counter()\n"
    "with open_datapath():\n"
    "    print(time.perf_counter() - started)\n"
)


def _timed_run(command: list[str], cache: Path | None = None) -> tuple[float, str]:
    environment = {**os.environ, **({PROGRAM_CACHE_ENV: str(cache)} if cache else {})}
    started = time.perf_counter()
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, timeout=120, env=environment
    ).stdout
    return time.perf_counter() - started, output


def _empty(cache: Path) -> None:
    shutil.rmtree(cache, ignore_errors=True)


def _cold_starts(runs: int, cache: Path, first_compile: bool) -> dict[str, Any]:
    """`runs` cold starts; first_compile: each with the cache emptied first."""
    python = str(BIN / "python")
    totals, imports, loads = [], [], []
    for _ in range(runs):
        refuse_if_busy()
        assert not pins_exist() and not our_filters(), "not a cold start: something of ours is loaded"
        if first_compile:
            _empty(cache)
        totals.append(_timed_run(FRONT_END, cache)[0])
        imports.append(_timed_run([python, "-c", IMPORT_ONLY], cache)[0])
        if first_compile:
            _empty(cache)
        loads.append(float(_timed_run([python, "-c", LOAD_ONLY], cache)[1]))
    return {
        "seconds": spread(totals),
        "breakdown_seconds": {
            "python_and_imports": spread(imports),
            "load_program": spread(loads),
            "rest_including_one_interval": statistics.median(totals)
            - statistics.median(imports)
            - statistics.median(loads),
        },
    }


def cold_start(settings: Settings, results: Results) -> Path:
    with tempfile.TemporaryDirectory(prefix="ettb-program-cache-") as private:
        cache = Path(private) / "cache"  # created 0700 by the loader, as /var/cache/egress-top is
        first = _cold_starts(settings.cold_starts, cache, first_compile=True)
        cache_filled = cache.is_dir() and any(cache.iterdir())
        cached = _cold_starts(settings.cold_starts, cache, first_compile=False) if cache_filled else None
    agent = start_agent("-i", "1")
    try:
        beside_agent = [_timed_run(FRONT_END)[0] for _ in range(settings.cold_starts)]
    finally:
        agent.stop()
    result = {
        "command": " ".join(["egress-top", *FRONT_END[1:]]),
        "first_compile": first,
        "cached_compile": cached,
        "cached_not_measured_because": None
        if cache_filled
        else f"a cold start left nothing in {PROGRAM_CACHE_ENV}: this build has no compiled-program cache",
        "beside_agent_seconds": spread(beside_agent),
    }
    return results.write("cold_start", result)
