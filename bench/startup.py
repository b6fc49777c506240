"""Start-up: `egress-top --json --count 1 -i 0.1` with nothing of ours loaded (a cold
start, and where its time goes), and beside a running agent (the datapath loaded and
pinned: the front end only opens the pins)."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path

from agent.datapath import our_filters, pins_exist
from bench.agent_cost import AgentProcess
from bench.common import BIN, Results, Settings, spread
from bench.environment import refuse_if_busy

FRONT_END = [str(BIN / "egress-top"), "--json", "--count", "1", "-i", "0.1"]
IMPORT_ONLY = "import agent.cli"
LOAD_ONLY = (
    "import time\n"
    "from agent.datapath import open_datapath\n"
    "started = time.perf_counter()\n"
    "with open_datapath():\n"
    "    print(time.perf_counter() - started)\n"
)


def _timed_run(command: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    output = subprocess.run(command, check=True, capture_output=True, text=True, timeout=120).stdout
    return time.perf_counter() - started, output


def cold_start(settings: Settings, results: Results) -> Path:
    python = str(BIN / "python")
    totals, imports, loads = [], [], []
    for _ in range(settings.cold_starts):
        refuse_if_busy()
        assert not pins_exist() and not our_filters(), "not a cold start: something of ours is loaded"
        totals.append(_timed_run(FRONT_END)[0])
        imports.append(_timed_run([python, "-c", IMPORT_ONLY])[0])
        loads.append(float(_timed_run([python, "-c", LOAD_ONLY])[1]))
    agent = AgentProcess()
    try:
        beside_agent = [_timed_run(FRONT_END)[0] for _ in range(settings.cold_starts)]
    finally:
        agent.stop()
    result = {
        "command": " ".join(["egress-top", *FRONT_END[1:]]),
        "seconds": spread(totals),
        "beside_agent_seconds": spread(beside_agent),
        "breakdown_seconds": {
            "python_and_imports": spread(imports),
            "compile_and_load_program": spread(loads),
            "rest_including_one_interval": statistics.median(totals)
            - statistics.median(imports)
            - statistics.median(loads),
        },
    }
    return results.write("cold_start", result)
