"""One tiny iteration of every benchmark, so bench/ does not rot (figures: sudo make bench)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_every_benchmark_runs_and_reports(tmp_path: Path, docker_client) -> None:  # type: ignore[no-untyped-def]
    # The session holds the machine lock (docker_client), so the bench is told to take
    # another. Its upstream netns uses the same addresses as the suite's: it must run
    # before the suite creates its own (this file sorts first, and this checks it).
    assert not [
        ns
        for ns in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout.split()
        if ns.startswith("ett-up-")
    ], "the suite's upstream exists already"
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "EGRESS_TOP_BENCH_LOCK": str(tmp_path / "lock")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    load = lambda name: json.loads((tmp_path / f"{name}.json").read_text())  # noqa: E731
    cost = load("datapath_cost")["scenarios"]
    assert set(cost) == {
        "no program",
        "egress-top counting",
        "egress-top, 10 rules",
        "iptables, 10 rules",
        "nftables set, 10 elements",
    }
    assert all(m["median"] > 0 for scenario in cost.values() for m in scenario.values())
    assert (
        load("rule_scaling")["rule_counts"] == [0, 10] and (tmp_path / "rule_scaling.png").stat().st_size > 0
    )
    assert load("read_and_aggregate")["levels"]["1000"]["read_ms"]["median"] > 0
    assert load("agent_cost")["cpu_percent_of_one_core"] >= 0
    latency = load("latency")
    assert latency["attach"]["tries"] == 2 and latency["block"]["tries"] == 2
    assert load("cold_start")["seconds"]["median"] > 0
    assert "## Datapath cost" in (tmp_path / "SUMMARY.md").read_text()
