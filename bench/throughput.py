"""Datapath cost and scaling with rules: iperf3 from a container to the upstream netns.

One interleaved run serves both benchmarks: every scenario (no program, a trivial tc
program, our counting program, ours/iptables/nftables at each rule count) takes its turn
in each round (a, b, c, ..., a, b, c, ...), so drift on the machine hits them all alike, and every
figure is a ratio to the no-program baseline of the same run. A second no-program
scenario (the control) shows how far apart two identical setups land: the noise floor.

The iperf3 client is the host's binary run inside the container's netns, so packets
leave through the container's eth0 and its host-side veth, where our program sits.
Client and server are pinned to CPUs 0 and 1 (iperf3 -A 0,1): the sender's CPU then
does all of the forwarding (veth, bridge, our program or the firewall, NAT), which
keeps the runs comparable on this 2-core machine. After the rounds, each scenario with a
BPF program gets one more run with the kernel's BPF statistics on, and the per-packet
cost against the trivial program is measured (bench/per_packet.py).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.datapath import Datapath, detach, open_datapath
from agent.policy import POLICY_ALLOW, POLICY_DROP, LpmEntry
from bench.bpf_stats import TrivialProgram, attached_program_id, cost, program_counters, statistics_enabled
from bench.common import Results, Settings, progress, spread
from bench.environment import (
    IPTABLES_HOOK_CHAIN,
    NETWORK_BRIDGE,
    NFT_TABLE,
    UPSTREAM_NETNS,
    UPSTREAM_SERVER,
    Environment,
    netns_exec,
    sh,
)
from bench.per_packet import per_packet_cost

# Rule contents only, never a destination: shared address space (RFC 6598).
NON_MATCHING = ipaddress.IPv4Network("100.64.0.0/10")
BENCH_SLOT = 4242  # policy slot of the client's veth; the rule store is not involved
IPERF_PORT = 5201
BASELINE = "no program"
CONTROL = "no program (control)"


def non_matching_addresses(count: int) -> list[ipaddress.IPv4Address]:
    first = int(NON_MATCHING.network_address)
    return [ipaddress.IPv4Address(first + n) for n in range(count)]


# --- what sits in the container's path --------------------------------------------------


class Scenario:
    """One configuration of the packet path. load() once (rules can be slow to write),
    setup()/teardown() around each turn, unload() at the end."""

    kind = "baseline"

    def __init__(self, rules: int = 0, name: str = BASELINE):
        self.rules = rules
        self.name = name

    def load(self) -> None:
        pass

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def unload(self) -> None:
        pass


class EgressTop(Scenario):
    """Our program on the client's veth; with rules, the veth is tagged as having policy
    and the trie holds exactly `rules` non-matching /32s (half block, half allow) for
    its slot, so every packet pays the three LPM lookups."""

    kind = "egress-top"

    def __init__(self, datapath: Datapath, ifindex: int, rules: int):
        super().__init__(rules, f"egress-top, {rules:,} rules" if rules else "egress-top counting")
        self.datapath, self.ifindex = datapath, ifindex
        self.entries = [
            (entry.key_bytes(), entry.value_bytes())
            for entry in (
                LpmEntry(4, BENCH_SLOT, 0, 0, address.packed, 32, n + 1, (POLICY_DROP, POLICY_ALLOW)[n % 2])
                for n, address in enumerate(non_matching_addresses(rules))
            )
        ]
        self.policy_write_seconds: list[float] = []

    def setup(self) -> None:
        if self.rules:
            started = time.perf_counter()
            self.datapath.sync_policy(self.entries)  # only this scenario's rules: a trie of `rules`
            self.policy_write_seconds.append(time.perf_counter() - started)
        self.datapath.set_endpoint(self.ifindex, BENCH_SLOT, has_policy=bool(self.rules))
        self.datapath.attach(self.ifindex)

    def teardown(self) -> None:
        detach(self.ifindex)
        self.datapath.set_endpoint(self.ifindex, BENCH_SLOT, has_policy=False)

    def unload(self) -> None:
        self.datapath.sync_policy([])


class Trivial(Scenario):
    """`return TC_ACT_OK` where our program goes: the floor a tc program costs."""

    kind = "trivial"

    def __init__(self, ifindex: int):
        super().__init__(0, "trivial tc program")
        self.ifindex = ifindex
        self.program: TrivialProgram | None = None

    def load(self) -> None:
        self.program = TrivialProgram()

    def setup(self) -> None:
        assert self.program is not None
        self.program.attach(self.ifindex)

    def teardown(self) -> None:
        TrivialProgram.detach(self.ifindex)

    def unload(self) -> None:
        if self.program is not None:
            self.program.close()


class Iptables(Scenario):
    """`rules` non-matching rules (half DROP, half ACCEPT) in a chain of our own, jumped to
    from DOCKER-USER for the container bridge's traffic: what a firewall-based tool does."""

    kind = "iptables"

    def __init__(self, rules: int):
        super().__init__(rules, f"iptables, {rules:,} rules")
        self.chain = f"ettb-r{rules}"

    def load(self) -> None:
        targets = ("DROP", "ACCEPT")
        lines = [
            "*filter",
            f":{self.chain} - [0:0]",
            *(
                f"-A {self.chain} -d {address}/32 -j {targets[n % 2]}"
                for n, address in enumerate(non_matching_addresses(self.rules))
            ),
            "COMMIT",
            "",
        ]
        sh("iptables-restore", "--noflush", stdin="\n".join(lines), timeout=600)

    def setup(self) -> None:
        sh("iptables", "-I", IPTABLES_HOOK_CHAIN, "1", "-i", NETWORK_BRIDGE, "-j", self.chain)

    def teardown(self) -> None:
        # by position (by value, iptables-nft would fetch the whole 100k-rule ruleset)
        first = sh("iptables", "-S", IPTABLES_HOOK_CHAIN, "1")
        if f"-j {self.chain}" in first:
            sh("iptables", "-D", IPTABLES_HOOK_CHAIN, "1")

    def unload(self) -> None:
        sh("iptables", "-F", self.chain)
        sh("iptables", "-X", self.chain)


class NftSet(Scenario):
    """`rules` addresses in an nftables set, one rule `ip daddr @set drop` in a chain on
    the forward hook: the way to do it with the kernel's own firewall."""

    kind = "nftables"

    def __init__(self, rules: int):
        super().__init__(rules, f"nftables set, {rules:,} elements")
        self.set = f"r{rules}"

    def load(self) -> None:
        elements = ", ".join(map(str, non_matching_addresses(self.rules)))
        body = f"elements = {{ {elements} }}" if elements else ""
        sh(
            "nft",
            "-f",
            "-",
            stdin=f"table inet {NFT_TABLE} {{\n set {self.set} {{ type ipv4_addr; {body} }}\n}}\n",
        )

    def setup(self) -> None:
        sh(
            "nft",
            "-f",
            "-",
            stdin=f"add chain inet {NFT_TABLE} forward {{ type filter hook forward priority 0; }}\n"
            f"add rule inet {NFT_TABLE} forward ip daddr @{self.set} drop\n",
        )

    def teardown(self) -> None:
        sh("nft", "delete", "chain", "inet", NFT_TABLE, "forward")

    def unload(self) -> None:
        sh("nft", "delete", "set", "inet", NFT_TABLE, self.set)


# --- iperf3 -----------------------------------------------------------------------------


class MeasurementFailed(Exception):
    """A run that produced no figure."""


@dataclass(frozen=True)
class Measure:
    name: str
    iperf_args: tuple[str, ...]
    primary: str  # the metric the ratios are about

    def parse(self, report: dict[str, Any]) -> dict[str, float]:
        end = report["end"]
        if self.primary == "bits_per_second":
            return {
                "bits_per_second": float(end["sum_received"]["bits_per_second"]),
                "retransmits": float(end["sum_sent"].get("retransmits", 0)),
            }
        received = end["sum_received"]  # the server's count, as the client got it back
        delivered = received["packets"] - received["lost_packets"]
        return {
            "packets_per_second": delivered / received["seconds"],
            "sent_packets_per_second": received["packets"] / received["seconds"],
            "loss_percent": float(received["lost_percent"]),
        }


TCP_1_STREAM = Measure("tcp_1_stream", ("-P", "1"), "bits_per_second")
TCP_4_STREAMS = Measure("tcp_4_streams", ("-P", "4"), "bits_per_second")
UDP_64B = Measure("udp_64B", ("-u", "-l", "64", "-b", "0"), "packets_per_second")


class Iperf:
    """An iperf3 server in the upstream netns, and the client in the container's netns."""

    def __init__(self, env: Environment, client_pid: int, seconds: int):
        self.client_pid = client_pid
        self.seconds = seconds
        self.server: subprocess.Popen[bytes] | None = None
        env.teardown.add("iperf3 server", self.stop_server)
        self.start_server()

    def start_server(self) -> None:
        server = ["iperf3", "-s", "-B", UPSTREAM_SERVER, "-p", str(IPERF_PORT)]
        self.server = subprocess.Popen(
            ["ip", "netns", "exec", UPSTREAM_NETNS, "timeout", "7200", *server],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(0.3)

    def stop_server(self) -> None:
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()  # `timeout` passes SIGTERM on to iperf3
            self.server.wait(timeout=10)

    def run(self, measure: Measure) -> dict[str, float]:
        command = [
            *netns_exec(self.client_pid),
            "timeout",
            str(self.seconds + 15),
            "iperf3",
            "-c",
            UPSTREAM_SERVER,
            "-p",
            str(IPERF_PORT),
            "-t",
            str(self.seconds),
            "-A",
            "0,1",
            "--connect-timeout",
            "3000",
            "-J",
            *measure.iperf_args,
        ]
        error = ""
        for _attempt in range(3):
            output = subprocess.run(command, capture_output=True, text=True).stdout
            report = json.loads(output) if output.strip() else {}
            if "end" in report and "error" not in report:
                return measure.parse(report)
            error = report.get("error", "no report (iperf3 timed out)")
            self.stop_server()  # a server left busy by a dead client refuses the next one
            self.start_server()
        raise MeasurementFailed(error)


# --- what a program on the veth costs per packet, from the kernel's own accounting -------


def _program_share(iperf: Iperf, measure: Measure, ifindex: int) -> dict[str, Any]:
    program_id = attached_program_id(ifindex)
    before, started = program_counters(program_id), time.monotonic()
    iperf.run(measure)
    return cost(before, program_counters(program_id), time.monotonic() - started)


def program_cost(scenarios: list[Scenario], iperf: Iperf, ifindex: int) -> dict[str, Any]:
    """One extra run of each measure per scenario with a BPF program on the veth (ours at
    each rule count, and the trivial one), the kernel's BPF run-time statistics on (they add
    two clock reads per run, so never in the scored rounds): what one run of the program
    costs (a packet; for TCP, a GSO super-packet of up to 64 KB) and the share of the
    sending CPU that makes, free of the throughput noise. Keyed by rule count, or "trivial"."""
    costs = {}
    with statistics_enabled():
        for scenario in scenarios:
            if isinstance(scenario, EgressTop | Trivial):
                scenario.setup()
                try:
                    key = "trivial" if isinstance(scenario, Trivial) else str(scenario.rules)
                    costs[key] = {m.name: _program_share(iperf, m, ifindex) for m in (TCP_1_STREAM, UDP_64B)}
                finally:
                    scenario.teardown()
    return costs


# --- the interleaved run ------------------------------------------------------------------

Samples = dict[str, dict[str, list[dict[str, float] | None]]]  # scenario -> measure -> per round


def interleave(
    scenarios: list[Scenario], measures: dict[str, list[Measure]], iperf: Iperf, repetitions: int
) -> Samples:
    """Every scenario's measures, round after round; a failed run is kept as None."""
    samples: Samples = {s.name: {m.name: [] for m in measures[s.name]} for s in scenarios}
    iperf.run(TCP_1_STREAM)  # warm-up, not kept: the very first run is slower
    for round_number in range(repetitions):
        started = time.monotonic()
        for scenario in scenarios:
            scenario.setup()
            try:
                for measure in measures[scenario.name]:
                    try:
                        samples[scenario.name][measure.name].append(iperf.run(measure))
                    except MeasurementFailed as failure:
                        progress(f"{scenario.name} {measure.name}: {failure}")
                        samples[scenario.name][measure.name].append(None)
            finally:
                scenario.teardown()
        progress(f"throughput round {round_number + 1}/{repetitions}: {time.monotonic() - started:.0f} s")
    return samples


@contextlib.contextmanager
def loaded(scenarios: list[Scenario]) -> Iterator[None]:
    """Every scenario's rules written once, removed at the end whatever happens."""
    try:
        for scenario in scenarios:
            scenario.load()
        yield
    finally:
        for scenario in scenarios:
            with contextlib.suppress(Exception):
                scenario.unload()


def compare(samples: Samples, scenario: str, measure: Measure) -> dict[str, Any] | None:
    """Every metric's median and min-max; the primary one's ratio to the baseline, both as
    ratio of medians and round by round (each round's value over that round's baseline)."""
    runs = samples[scenario][measure.name]
    baseline = samples[BASELINE][measure.name]
    done = [run for run in runs if run is not None]
    if not done:
        return None
    result: dict[str, Any] = {name: spread([run[name] for run in done]) for name in done[0]}
    result["failed_runs"] = len(runs) - len(done)
    base = [run[measure.primary] for run in baseline if run is not None]
    result["ratio_to_baseline"] = result[measure.primary]["median"] / spread(base)["median"]
    paired = [
        run[measure.primary] / base_run[measure.primary]
        for run, base_run in zip(runs, baseline, strict=True)
        if run is not None and base_run is not None
    ]
    result["ratio_per_round"] = spread(paired) if paired else None
    result["rounds"] = [run[measure.primary] if run is not None else None for run in runs]
    return result


class Plan:
    """Which scenarios and measures the selected benchmarks need, built once, shared."""

    def __init__(self, datapath: Datapath, ifindex: int, settings: Settings, cost: bool, scaling: bool):
        self.settings, self.ifindex = settings, ifindex
        counts = set(settings.rule_counts if scaling else ())
        if cost:
            counts |= {0, settings.cost_rules}
        self.rule_counts = sorted(counts)
        self.baseline = Scenario()
        self.control = Scenario(name=CONTROL) if cost else None
        self.trivial: Trivial | None = None
        self.by_kind: dict[tuple[str, int], Scenario] = {}
        for count in self.rule_counts:
            self.by_kind["egress-top", count] = EgressTop(datapath, ifindex, count)
            if scaling or count == settings.cost_rules:
                self.by_kind["iptables", count] = Iptables(count)
                self.by_kind["nftables", count] = NftSet(count)
        self.cost_scenarios: list[Scenario] = []
        if cost:
            self.trivial = Trivial(ifindex)
            self.cost_scenarios = [
                self.baseline,
                self.trivial,
                self.by_kind["egress-top", 0],
                self.by_kind["egress-top", settings.cost_rules],
                self.by_kind["iptables", settings.cost_rules],
                self.by_kind["nftables", settings.cost_rules],
            ]

    def per_packet(self, client_pid: int) -> dict[str, Any]:
        """Ours (counting; with the cost rule count) against the trivial program."""
        assert self.trivial is not None
        rules = self.settings.cost_rules
        programs = {
            "trivial": self.trivial,
            "counting": self.by_kind["egress-top", 0],
            "rules": self.by_kind["egress-top", rules],
        }
        return per_packet_cost(programs, self.ifindex, client_pid, self.settings, rules)

    def scenarios(self) -> list[Scenario]:
        ordered = [self.baseline, *([self.trivial] if self.trivial else []), *self.by_kind.values()]
        return ordered + ([self.control] if self.control else [])

    def measures(self) -> dict[str, list[Measure]]:
        extra = {s.name for s in self.cost_scenarios} | ({CONTROL} if self.control else set())
        return {
            s.name: [TCP_1_STREAM, *([TCP_4_STREAMS] if s.name in extra else []), UDP_64B]
            for s in self.scenarios()
        }


COST_LABELS = ("(a)", "(t)", "(b)", "(c)", "(d)", "(e)")


def datapath_cost_result(plan: Plan, samples: Samples) -> dict[str, Any]:
    rows = []
    for label, scenario in zip(COST_LABELS, plan.cost_scenarios, strict=True):
        rows.append(_row(label, scenario, samples))
    assert plan.control is not None
    rows.append(_row("(a')", plan.control, samples))
    return {
        "rules": plan.settings.cost_rules,
        "seconds_per_run": plan.settings.seconds,
        "repetitions": plan.settings.repetitions,
        "scenarios": rows,
    }


def _row(label: str, scenario: Scenario, samples: Samples) -> dict[str, Any]:
    measures = (TCP_1_STREAM, TCP_4_STREAMS, UDP_64B)
    return {
        "label": label,
        "scenario": scenario.name,
        "kind": scenario.kind,
        "rules": scenario.rules,
        **{m.name: compare(samples, scenario.name, m) for m in measures},
    }


def rule_scaling_result(plan: Plan, samples: Samples) -> dict[str, Any]:
    levels = {}
    for count in plan.rule_counts:
        levels[str(count)] = {
            kind: {
                m.name: compare(samples, plan.by_kind[kind, count].name, m) for m in (TCP_1_STREAM, UDP_64B)
            }
            for kind in ("egress-top", "iptables", "nftables")
            if (kind, count) in plan.by_kind
        }
    policy_writes = {
        str(count): spread(scenario.policy_write_seconds)
        for (kind, count), scenario in plan.by_kind.items()
        if isinstance(scenario, EgressTop) and scenario.policy_write_seconds
    }
    return {
        "rule_counts": plan.rule_counts,
        "repetitions": plan.settings.repetitions,
        "seconds_per_run": plan.settings.seconds,
        "baseline": {m.name: compare(samples, BASELINE, m) for m in (TCP_1_STREAM, UDP_64B)},
        "levels": levels,
        "sync_policy_seconds": policy_writes,
    }


def run_throughput(
    env: Environment, settings: Settings, results: Results, cost: bool, scaling: bool
) -> list[Path]:
    """Both throughput benchmarks from one interleaved run; returns the files written."""
    client = env.container("client")
    ifindex = env.veth_ifindexes([client])[client.name]
    iperf = Iperf(env, env.pid(client), settings.seconds)
    with open_datapath() as datapath:
        plan = Plan(datapath, ifindex, settings, cost, scaling)
        scenarios = plan.scenarios()
        progress(
            f"throughput: {len(scenarios)} scenarios, {settings.repetitions} rounds of {settings.seconds} s"
        )
        with loaded(scenarios):
            samples = interleave(scenarios, plan.measures(), iperf, settings.repetitions)
            costs = program_cost(scenarios, iperf, ifindex)
            per_packet = plan.per_packet(env.pid(client)) if cost else None
    iperf.stop_server()
    env.remove(client)
    written = []
    if cost:
        cost_result = datapath_cost_result(plan, samples)
        cost_result["program_cost"] = {
            key: costs[key] for key in ("trivial", "0", str(settings.cost_rules)) if key in costs
        }
        cost_result["per_packet"] = per_packet
        written.append(results.write("datapath_cost", cost_result))
    if scaling:
        scaling_result = rule_scaling_result(plan, samples) | {"program_cost": costs}
        written.append(results.write("rule_scaling", scaling_result))
        written.append(plot_scaling(scaling_result, results.directory))
    return written


def plot_scaling(result: dict[str, Any], directory: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    figure.tight_layout()
    path = directory / "rule_scaling.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
