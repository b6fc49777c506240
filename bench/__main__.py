"""sudo .venv/bin/python -m bench [--quick | --smoke] [--only NAME ...]

Runs every benchmark side by side in one run and writes bench/results/*.json, the
rule-scaling plot and bench/results/SUMMARY.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

from agent.datapath import open_datapath
from bench.common import FULL, QUICK, SMOKE, Environment, Settings, environment, results_dir, write_result
from bench.control_plane import agent_cost, cold_start, read_and_aggregate
from bench.latency import latencies
from bench.throughput import Bench, datapath_cost, rule_scaling

NAMES = ("datapath", "scaling", "latency", "agent", "read", "startup")


def run_throughput(env: Environment, settings: Settings, only: set[str]) -> None:
    if not only & {"datapath", "scaling"}:
        return
    with open_datapath() as datapath:
        bench = Bench(env, datapath, settings)
        try:
            if "datapath" in only:
                datapath_cost(bench)
            if "scaling" in only:
                rule_scaling(bench)
        finally:
            bench.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer repetitions and sizes (~5 minutes)")
    size.add_argument("--smoke", action="store_true", help="one tiny iteration of each (~1 minute)")
    parser.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES))
    parser.add_argument("--results", help="directory for the results (default: bench/results)")
    args = parser.parse_args()
    if args.results:
        os.environ["EGRESS_TOP_BENCH_RESULTS"] = args.results
    settings = SMOKE if args.smoke else QUICK if args.quick else FULL
    # SIGTERM unwinds like an exception, so the environment's cleanup still runs
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    only = set(args.only)
    started = time.time()
    with environment() as env:
        run_throughput(env, settings, only)
        steps: dict[str, Callable[[], Any]] = {
            "latency": lambda: latencies(env, settings),
            "agent": lambda: agent_cost(env, settings),
            "read": lambda: read_and_aggregate(settings),
            "startup": lambda: cold_start(settings),
        }
        for name, step in steps.items():
            if name in only:
                step()
    write_result(
        "run",
        {
            "settings": settings.__dict__,
            "seconds": time.time() - started,
            "kernel": platform.release(),
            "command": "sudo make bench"
            + (" (--quick)" if args.quick else " (--smoke)" if args.smoke else ""),
        },
    )
    (results_dir() / "SUMMARY.md").write_text(summary_markdown())
    print((results_dir() / "SUMMARY.md").read_text())


def _load(name: str) -> dict[str, Any] | None:
    path = results_dir() / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def _rate(value: float, unit: str) -> str:
    return f"{value / 1e9:.2f} Gb/s" if unit == "bps" else f"{value / 1e3:.0f} kpps"


def summary_markdown() -> str:
    lines = ["# egress-top benchmark results", ""]
    run = _load("run")
    if run:
        lines += [
            f"Kernel {run['kernel']}, {run['settings']['repetitions']} interleaved repetitions, "
            f"{run['settings']['seconds']} s per throughput run, total {run['seconds'] / 60:.1f} min. "
            f"Reproduce: `{run['command']}`.",
            "",
        ]
    cost = _load("datapath_cost")
    if cost:
        lines += [
            f"## Datapath cost ({cost['rules']} non-matching rules where rules apply)",
            "",
            "| scenario | TCP 1 stream | TCP 4 streams | UDP 64 B |",
            "|---|---|---|---|",
        ]
        for scenario, measures in cost["scenarios"].items():
            cells = []
            for measure, unit in (
                ("tcp_1_stream_bps", "bps"),
                ("tcp_4_streams_bps", "bps"),
                ("udp_64B_pps", "pps"),
            ):
                m = measures[measure]
                cells.append(
                    f"{_rate(m['median'], unit)} ({m['ratio_to_baseline']:.3f}; "
                    f"{_rate(m['min'], unit)}-{_rate(m['max'], unit)})"
                )
            lines.append(f"| {scenario} | " + " | ".join(cells) + " |")
        lines += ["", "Median (ratio to no program; min-max).", ""]
    scaling = _load("rule_scaling")
    if scaling:
        lines += [
            "## Throughput ratio vs number of non-matching rules",
            "",
            "| rules | egress-top TCP | iptables TCP | nftables TCP | egress-top UDP | iptables UDP | nftables UDP |",
            "|---|---|---|---|---|---|---|",
        ]
        for count in scaling["rule_counts"]:
            level = scaling["levels"][str(count)]
            cells = [
                f"{level[kind][measure]['ratio_to_baseline']:.3f}" if level[kind][measure] else "failed"
                for measure in ("tcp_1_stream_bps", "udp_64B_pps")
                for kind in ("egress-top", "iptables", "nftables")
            ]
            lines.append(f"| {count:,} | " + " | ".join(cells) + " |")
        lines += ["", "![rule scaling](rule_scaling.png)", ""]
        if scaling.get("failures"):
            lines += [
                f"Runs that could not complete (counted as failed, not as 0): {json.dumps(scaling['failures'])}",
                "",
            ]
    read = _load("read_and_aggregate")
    if read:
        lines += [
            "## Flow-table refresh (read + aggregate, 200 containers, 1% of flows moving)",
            "",
            "| flows | read ms | aggregate ms | refresh ms |",
            "|---|---|---|---|",
        ]
        for count, level in read["levels"].items():
            lines.append(
                f"| {int(count):,} | {level['read_ms']['median']:.1f} | {level['aggregate_ms']['median']:.1f} | "
                f"{level['refresh_ms']['median']:.1f} |"
            )
        lines.append("")
    agent = _load("agent_cost")
    if agent:
        lines += [
            f"## Agent cost: {agent['containers']} containers, {agent['flows']:,} flows, refresh every 1 s",
            "",
            f"CPU {agent['cpu_percent_of_one_core']:.1f}% of one core over {agent['seconds']:.0f} s; "
            f"RSS median {agent['rss_mb']['median']:.0f} MB, max {agent['rss_mb']['max']:.0f} MB.",
            "",
        ]
    latency = _load("latency")
    if latency:
        attach, block = latency["attach"], latency["block"]
        first = attach["start_call_to_first_counted_ms"] or {"p50": float("nan"), "p99": float("nan")}
        lines += [
            "## Latencies",
            "",
            f"- Attach ({attach['tries']} container starts, {attach['pings_per_try']} pings each from the "
            f"first instant): no packet missed in {100 * attach['tries_with_no_packet_missed']:.0f}% of tries; "
            f"missed median {attach['missed_packets']['median']:.0f}, max {attach['missed_packets']['max']:.0f}; "
            f"start call -> first packet counted p50 {first['p50']:.0f} ms, p99 {first['p99']:.0f} ms.",
            f"- Block ({block['tries']} tries, a datagram every {block['send_period_ms']:.0f} ms): "
            f"egress-block returning -> first drop p50 {block['block_return_to_first_drop_ms']['p50']:.1f} ms, "
            f"p99 {block['block_return_to_first_drop_ms']['p99']:.1f} ms (negative: in force before the "
            f"command returned); datagrams that passed after it returned: "
            f"{block['datagrams_passed_after_block_returned']}; the command itself "
            f"{block['egress_block_command_seconds']['median'] * 1000:.0f} ms median.",
        ]
        if block["unblock_return_to_passing_ms"]:
            lines.append(
                f"- Unblock: egress-unblock returning -> passing again p50 "
                f"{block['unblock_return_to_passing_ms']['p50']:.1f} ms, "
                f"p99 {block['unblock_return_to_passing_ms']['p99']:.1f} ms."
            )
        lines.append("")
    start = _load("cold_start")
    if start:
        lines += [
            "## Cold start",
            "",
            f"`egress-top --json --count 1 -i 0.1`: median "
            f"{start['seconds']['median']:.2f} s (min {start['seconds']['min']:.2f}, max "
            f"{start['seconds']['max']:.2f}), BCC compile included.",
            "",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
