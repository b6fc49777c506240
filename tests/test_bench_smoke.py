"""One tiny iteration of every benchmark (`python -m bench --smoke`), so bench/ cannot rot.
The figures themselves come from `sudo make bench`; this checks that each benchmark runs,
reports sane numbers, and leaves nothing behind."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import pytest

from agent.datapath import our_filters, pins_exist

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.system


def positive_median(figure: dict[str, Any] | None) -> bool:
    return figure is not None and figure["median"] > 0


def test_every_benchmark_runs_reports_and_cleans_up(tmp_path: Path) -> None:
    # The bench takes the machine lock itself, or runs under the session's when it holds it.
    result = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-4000:]

    def load(name: str) -> dict[str, Any]:
        return json.loads((tmp_path / f"{name}.json").read_text())

    cost = load("datapath_cost")
    assert [row["label"] for row in cost["scenarios"]] == ["(a)", "(b)", "(c)", "(d)", "(e)", "(a')"]
    for row in cost["scenarios"]:
        assert positive_median(row["tcp_1_stream"]["bits_per_second"]), row
        assert positive_median(row["tcp_4_streams"]["bits_per_second"]), row
        assert positive_median(row["udp_64B"]["packets_per_second"]), row
        assert 0 <= row["udp_64B"]["loss_percent"]["median"] <= 100
        assert all(row[m]["ratio_to_baseline"] > 0 for m in ("tcp_1_stream", "tcp_4_streams", "udp_64B"))
    assert set(cost["program_cost"]) == {"0", "10"}
    assert all(m["ns_per_run"] > 0 for level in cost["program_cost"].values() for m in level.values())

    scaling = load("rule_scaling")
    assert scaling["rule_counts"] == [0, 10]
    for level in scaling["levels"].values():
        assert set(level) == {"egress-top", "iptables", "nftables"}
        assert all(figures["udp_64B"]["ratio_to_baseline"] > 0 for figures in level.values())
    assert (tmp_path / "rule_scaling.png").read_bytes().startswith(b"\x89PNG")

    refresh = load("read_and_aggregate")["levels"]["1000"]
    assert refresh["1%"]["flows_read"] == 1000
    assert positive_median(refresh["1%"]["read_ms"]) and positive_median(refresh["100%"]["refresh_ms"])

    agent = load("agent_cost")
    assert agent["containers"] == 2 and agent["flows"] == 1000
    assert agent["loaded"]["cpu_percent_of_one_core"] >= 0 and positive_median(agent["loaded"]["VmRSS_mb"])

    latency = load("latency")
    assert latency["attach"]["tries"] == 2 and latency["block"]["tries"] == 2
    assert latency["attach"]["start_call_to_first_counted_ms"]["p50"] > 0
    assert latency["block"]["block_returned_to_first_drop_ms"] is not None
    assert positive_median(latency["block"]["egress_block_command_seconds"])

    assert positive_median(load("cold_start")["seconds"])
    assert load("run")["run"]["profile"] == "smoke"
    summary = (tmp_path / "SUMMARY.md").read_text()
    assert "## Targets" in summary and "## Datapath cost" in summary

    # nothing of the bench is left: containers, network, netns, filters, pins, firewall rules
    client = docker.from_env()
    assert not [c.name for c in client.containers.list(all=True) if c.name.startswith("ettb-")]
    assert not client.networks.list(names=["ettb-net"])
    assert "ettb-up" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    assert not our_filters() and not pins_exist()
    assert "ettb" not in subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
    assert "ettb" not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
