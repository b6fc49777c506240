"""The benchmarks' plots: throughput ratio vs rules, the agent's memory and CPU over time."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any


def pyplot() -> ModuleType:
    """matplotlib.pyplot on the Agg backend (no display), imported only by a run that plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot().close(figure)
    return path


PHASE_COLOURS = {"idle": "grey", "real": "tab:green"}
PHASE_LABELS = {"idle": "empty table", "real": "real flows"}


def plot_scaling(result: dict[str, Any], directory: Path) -> Path:
    plt = pyplot()
    counts = result["rule_counts"]
    positions = [max(count, 1) for count in counts]  # 0 rules plotted at 1 on the log axis
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    panels = (("tcp_1_stream", "TCP, 1 stream"), ("udp_64B", "UDP, 64-byte datagrams (packets/s)"))
    for axis, (measure, title) in zip(axes, panels, strict=True):
        for kind, style in (("egress-top", "o-"), ("iptables", "s-"), ("nftables", "^-")):
            xs, medians, low, high = [], [], [], []
            for position, count in zip(positions, counts, strict=True):
                figure_for = result["levels"][str(count)].get(kind, {}).get(measure)
                if figure_for is None:
                    continue
                per_round = figure_for["ratio_per_round"] or {"min": None, "max": None}
                ratio = figure_for["ratio_to_baseline"]
                xs.append(position)
                medians.append(ratio)
                low.append(ratio - (per_round["min"] if per_round["min"] is not None else ratio))
                high.append((per_round["max"] if per_round["max"] is not None else ratio) - ratio)
            axis.errorbar(xs, medians, yerr=[low, high], fmt=style, capsize=3, label=kind)
        axis.set_xscale("log")
        axis.set_xlabel("non-matching rules (0 plotted at 1)")
        axis.set_ylabel("throughput / no program")
        axis.set_ylim(0, 1.3)
        axis.axhline(0.97, color="grey", linestyle=":", linewidth=1)
        axis.set_title(title)
        axis.legend(loc="lower left")
    figure.suptitle(
        f"Container egress vs rules: median ratio to no program, bars = per-round min-max "
        f"({result['repetitions']} interleaved rounds of {result['seconds_per_run']} s)",
        fontsize=10,
    )
    return save_figure(figure, directory / "rule_scaling.png")


def plot_agent(result: dict[str, Any], directory: Path) -> Path:
    plt = pyplot()
    series = result["series"]
    times = [s["t"] for s in series]
    figure, (memory, cpu) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    for name in ("VmRSS_mb", "RssAnon_mb", "RssFile_mb"):
        memory.plot(times, [s.get(name, 0) for s in series], label=name.removesuffix("_mb"))
    memory.set_ylim(bottom=0)
    memory.set_ylabel("MB")
    memory.legend(loc="upper left")
    cpu.plot(times, [s["cpu_percent"] for s in series], color="tab:red")
    cpu.set_ylabel("CPU, % of one core")
    cpu.set_xlabel("seconds since the agent was ready")
    for axis in (memory, cpu):
        for name, (begin, end) in result["phases"].items():
            axis.axvspan(begin, end, alpha=0.12, color=PHASE_COLOURS[name])
            axis.text(begin, axis.get_ylim()[1] * 0.92, f" {PHASE_LABELS[name]}", fontsize=8)
    real = result["real_flows"]
    figure.suptitle(
        f"{result['command']}, {result['containers']} containers; {real['in_table']:,} real flows "
        f"from {real['senders']} of them, 1% sent again each second",
        fontsize=9,
    )
    return save_figure(figure, directory / "agent_cost.png")
