"""Datapath cost and scaling with rules: iperf3 from a container to the upstream netns.

Scenarios are interleaved (a, b, c, ..., a, b, c, ...) so drift on the machine hits
them all alike; every figure is reported with its ratio to the no-program baseline
of the same run. The iperf3 client is the host's binary run inside the container's
netns, so its packets leave through the container's eth0 and host-side veth.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import UPSTREAM_V4
from runner import veth_ifindexes

from agent.datapath import Datapath, detach
from agent.policy import POLICY_DROP, LpmEntry
from bench.common import Environment, Settings, results_dir, summary, write_result

# Rule contents only, never destinations: 100.64.0.0/10 (shared address space).
NON_MATCHING_BASE = int(ipaddress.IPv4Address("100.64.0.0"))
BENCH_SLOT = 4242
IPERF_PORT = 5201


def non_matching_addresses(count: int) -> list[str]:
    return [str(ipaddress.IPv4Address(NON_MATCHING_BASE + n)) for n in range(count)]


class MeasurementFailed(Exception):
    """A run that produced no figure (e.g. iperf3 could not finish through 100k iptables rules)."""


@dataclass
class Scenario:
    name: str
    setup: Callable[[], None]
    teardown: Callable[[], None]


class Bench:
    """One container, its veth, an iperf3 server upstream, and our datapath loaded."""

    def __init__(self, env: Environment, datapath: Datapath, settings: Settings):
        self.env = env
        self.datapath = datapath
        self.settings = settings
        self.container = env.lab.container("ettb-client", network=env.lab.network())
        self.pid = env.lab.pid(self.container)
        (self.ifindex,) = veth_ifindexes(self.pid)
        self.server = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                env.upstream.netns,
                "timeout",
                "3600",
                "iperf3",
                "-s",
                "-B",
                UPSTREAM_V4,
                "-p",
                str(IPERF_PORT),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def close(self) -> None:
        self.server.terminate()  # SIGTERM: `timeout` passes it on to iperf3 (SIGKILL would orphan it)
        self.server.wait()
        detach(self.ifindex)
        self.datapath.sync_policy([])

    # --- what runs on the veth -----------------------------------------------------

    def ours(self, rules: int) -> Scenario:
        def setup() -> None:
            self.datapath.attach(self.ifindex)
            entries = [
                LpmEntry(4, BENCH_SLOT, 0, 0, ipaddress.IPv4Address(a).packed, 32, n + 1, POLICY_DROP)
                for n, a in enumerate(non_matching_addresses(rules))
            ]
            self.datapath.sync_policy((e.key_bytes(), e.value_bytes()) for e in entries)
            self.datapath.set_endpoint(self.ifindex, BENCH_SLOT, has_policy=rules > 0)

        def teardown() -> None:
            detach(self.ifindex)
            self.datapath.sync_policy([])

        return Scenario(f"egress-top, {rules} rules" if rules else "egress-top counting", setup, teardown)

    @staticmethod
    def nothing() -> Scenario:
        return Scenario("no program", lambda: None, lambda: None)

    @staticmethod
    def iptables(rules: int) -> Scenario:
        def setup() -> None:
            lines = [
                "*filter",
                ":ETTB - [0:0]",
                *(f"-A ETTB -d {a}/32 -j DROP" for a in non_matching_addresses(rules)),
            ]
            subprocess.run(
                ["iptables-restore", "--noflush"],
                input="\n".join([*lines, "COMMIT", ""]),
                text=True,
                check=True,
            )
            subprocess.run(["iptables", "-I", "DOCKER-USER", "-j", "ETTB"], check=True)

        def teardown() -> None:
            subprocess.run(["iptables", "-D", "DOCKER-USER", "-j", "ETTB"], check=False)
            subprocess.run(["iptables", "-F", "ETTB"], check=False)
            subprocess.run(["iptables", "-X", "ETTB"], check=False)

        return Scenario(f"iptables, {rules} rules", setup, teardown)

    @staticmethod
    def nft_set(rules: int) -> Scenario:
        def setup() -> None:
            elements = ", ".join(non_matching_addresses(rules)) or "192.0.2.255"
            ruleset = (
                "table inet ettb {\n"
                f"  set blocked {{ type ipv4_addr; flags interval; elements = {{ {elements} }} }}\n"
                "  chain forward { type filter hook forward priority -1; ip daddr @blocked drop; }\n"
                "}\n"
            )
            with tempfile.NamedTemporaryFile("w", suffix=".nft") as script:
                script.write(ruleset)
                script.flush()
                subprocess.run(["nft", "-f", script.name], check=True)

        def teardown() -> None:
            subprocess.run(["nft", "delete", "table", "inet", "ettb"], check=False)

        return Scenario(f"nftables set, {rules} elements", setup, teardown)

    # --- measurements -------------------------------------------------------------------

    def iperf(self, *extra: str) -> dict[str, Any]:
        """One iperf3 run; retried while the server is still starting or busy."""
        command = [
            "nsenter",
            f"--net=/proc/{self.pid}/ns/net",
            "timeout",
            str(self.settings.seconds + 20),
            "iperf3",
            "-c",
            UPSTREAM_V4,
            "-p",
            str(IPERF_PORT),
            "-t",
            str(max(1, round(self.settings.seconds))),
            "-J",
            *extra,
        ]
        for _attempt in range(3):
            report = json.loads(subprocess.run(command, capture_output=True, text=True).stdout or "{}")
            if "error" not in report and "end" in report:
                return report
            time.sleep(0.5)
        raise MeasurementFailed(report.get("error") or "no report (iperf3 timed out)")

    def tcp_bits_per_second(self, streams: int) -> float:
        return float(self.iperf("-P", str(streams))["end"]["sum_received"]["bits_per_second"])

    def udp64_packets_per_second(self) -> float:
        total = self.iperf("-u", "-l", "64", "-b", "0")["end"]["sum"]
        return (total["packets"] - total["lost_packets"]) / total["seconds"]

    def measures(self, with_parallel: bool) -> dict[str, Callable[[], float]]:
        chosen: dict[str, Callable[[], float]] = {"tcp_1_stream_bps": lambda: self.tcp_bits_per_second(1)}
        if with_parallel:
            chosen["tcp_4_streams_bps"] = lambda: self.tcp_bits_per_second(4)
        chosen["udp_64B_pps"] = self.udp64_packets_per_second
        return chosen


def interleave(
    scenarios: list[Scenario],
    measures: dict[str, Callable[[], float]],
    repetitions: int,
    failures: dict[str, dict[str, list[str]]],
) -> dict[str, dict[str, list[float]]]:
    """Samples per scenario and measure; a run that could not complete goes to `failures`."""
    samples: dict[str, dict[str, list[float]]] = {s.name: {m: [] for m in measures} for s in scenarios}
    for _ in range(repetitions):
        for scenario in scenarios:
            scenario.setup()
            try:
                for name, measure in measures.items():
                    try:
                        samples[scenario.name][name].append(measure())
                    except MeasurementFailed as failure:
                        failures.setdefault(scenario.name, {}).setdefault(name, []).append(str(failure))
            finally:
                scenario.teardown()
    return samples


def with_ratios(samples: dict[str, dict[str, list[float]]], baseline: str) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for scenario, by_measure in samples.items():
        table[scenario] = {}
        for measure, values in by_measure.items():
            if not values:
                table[scenario][measure] = None  # every run failed: see "failures"
                continue
            stats: dict[str, Any] = summary(values)
            stats["ratio_to_baseline"] = stats["median"] / summary(samples[baseline][measure])["median"]
            table[scenario][measure] = stats
    return table


def datapath_cost(bench: Bench) -> dict[str, Any]:
    rules = 10_000 if bench.settings.rule_counts[-1] >= 10_000 else bench.settings.rule_counts[-1]
    scenarios = [
        bench.nothing(),
        bench.ours(0),
        bench.ours(rules),
        bench.iptables(rules),
        bench.nft_set(rules),
    ]
    failures: dict[str, dict[str, list[str]]] = {}
    samples = interleave(scenarios, bench.measures(with_parallel=True), bench.settings.repetitions, failures)
    result = {
        "failures": failures,
        "rules": rules,
        "seconds_per_run": bench.settings.seconds,
        "scenarios": with_ratios(samples, "no program"),
    }
    write_result("datapath_cost", result)
    return result


def rule_scaling(bench: Bench) -> dict[str, Any]:
    """For each rule count: baseline, ours, iptables, nftables, interleaved at that count."""
    levels: dict[str, Any] = {}
    failures: dict[str, dict[str, list[str]]] = {}
    measures = bench.measures(with_parallel=False)
    for count in bench.settings.rule_counts:
        scenarios = [bench.nothing(), bench.ours(count), bench.iptables(count), bench.nft_set(count)]
        samples = interleave(scenarios, measures, bench.settings.scaling_repetitions, failures)
        levels[str(count)] = {
            kind: stats
            for kind, stats in zip(
                ("baseline", "egress-top", "iptables", "nftables"),
                with_ratios(samples, "no program").values(),
                strict=True,
            )
        }
    result = {"rule_counts": list(bench.settings.rule_counts), "levels": levels, "failures": failures}
    write_result("rule_scaling", result)
    plot_scaling(result, bench.settings)
    return result


def plot_scaling(result: dict[str, Any], settings: Settings) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = result["rule_counts"]
    x = [max(c, 1) for c in counts]
    figure, axes = plt.subplots(1, 2, figsize=(11, 4))
    for axis, measure, title in zip(
        axes, ("tcp_1_stream_bps", "udp_64B_pps"), ("TCP, 1 stream", "UDP 64-byte packets/s"), strict=True
    ):
        for kind in ("egress-top", "iptables", "nftables"):
            ratios = [
                (result["levels"][str(c)][kind][measure] or {}).get("ratio_to_baseline") for c in counts
            ]
            axis.plot(x, [float("nan") if r is None else r for r in ratios], marker="o", label=kind)
        axis.set_xscale("log")
        axis.set_xlabel("non-matching rules (0 plotted at 1)")
        axis.set_ylabel("throughput / no program")
        axis.set_ylim(0, 1.3)
        axis.axhline(0.97, color="grey", linestyle=":", linewidth=1)
        axis.set_title(title)
        axis.legend()
    figure.suptitle(
        f"Container egress throughput vs rules (median of {settings.scaling_repetitions}, same run)"
    )
    figure.tight_layout()
    path = results_dir() / "rule_scaling.png"
    figure.savefig(path, dpi=100)
    return path
