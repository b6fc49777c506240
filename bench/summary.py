"""bench/results/SUMMARY.md from the result files: tables ready to paste into the README,
every target next to what was measured, and for a missed one why and what would close it;
README's block of figures, from the same sections so the two cannot disagree."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from bench.common import Results
from bench.markdown import DASH, Data
from bench.peers import peers_section
from bench.report_datapath import datapath_section, per_packet_section, scaling_section, udp_ab_section
from bench.report_host import agent_section, cold_start_section, latency_section, refresh_section
from bench.targets import targets_section


def header(run: Data | None) -> list[str]:
    lines = ["# egress-top benchmark results", ""]
    if run:
        settings = run["settings"]
        steps = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in run["step_seconds"].items())
        lines += [
            f"Run {run['run']['started']}: `{run['command']}` (profile {run['run']['profile']}), kernel "
            f"{run['kernel']}, {run['cpus']} CPUs, {run['seconds'] / 60:.1f} min ({steps}).",
            "",
            f"Throughput: {settings['repetitions']} interleaved rounds of every scenario "
            f"(a, b, c, ..., a, b, c, ...), {settings['seconds']} s per iperf3 run, client and server "
            f"pinned to CPUs 0 and 1. Figures: median (min{DASH}max). Ratios: to the no-program "
            f"baseline (a) of the same run, median over median, with the min{DASH}max of the "
            "round-by-round ratios.",
            "",
        ]
    return lines


README_BEGIN = "<!-- bench-summary: written by `python -m bench` from bench/results; do not edit -->"
README_END = "<!-- /bench-summary -->"


def readme_block(results: Results) -> list[str]:
    """What README quotes: the run, the targets and the per-packet table, from SUMMARY.md's
    own sections, so the two cannot disagree."""
    run, cost = results.load("run"), results.load("datapath_cost")
    lines = [README_BEGIN, ""]
    if run:
        lines += [
            f"Recorded run {run['run']['started']} (profile {run['run']['profile']}, kernel {run['kernel']}, "
            f"{run['cpus']} CPUs): `{run['command']}`. Everything else it measured, with min{DASH}max: "
            "[bench/results/SUMMARY.md](bench/results/SUMMARY.md).",
            "",
        ]
    agent = results.load("agent_cost")
    lines += targets_section(results) + (per_packet_section(cost) if cost else [])
    lines += peers_section(agent) if agent else []
    return [*lines, README_END]


def update_readme(results: Results, readme: Path) -> bool:
    """Replace the block between the markers; False when README has no such block."""
    text = readme.read_text()
    begin, end = text.find(README_BEGIN), text.find(README_END)
    if begin < 0 or end < begin:
        return False
    block = "\n".join(readme_block(results)).replace("## ", "#### ")
    readme.write_text(text[:begin] + block + text[end + len(README_END) :])
    return True


def write_summary(results: Results) -> Path:
    sections: list[tuple[str, Callable[[Data], list[str]]]] = [
        ("datapath_cost", datapath_section),
        ("datapath_cost", udp_ab_section),
        ("datapath_cost", per_packet_section),
        ("rule_scaling", scaling_section),
        ("read_and_aggregate", refresh_section),
        ("agent_cost", agent_section),
        ("agent_cost", peers_section),
        ("latency", latency_section),
        ("cold_start", cold_start_section),
    ]
    lines = header(results.load("run")) + targets_section(results)
    runs = set()
    for name, render in sections:
        data = results.load(name)
        if data is not None:
            lines += render(data)
            runs.add(data["run"]["started"])
    if len(runs) > 1:
        lines += [
            f"These figures come from {len(runs)} runs ({', '.join(sorted(runs))}): see `run` in each file.",
            "",
        ]
    path = results.directory / "SUMMARY.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path
