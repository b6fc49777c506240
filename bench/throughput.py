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
BPF program gets one more run with the kernel's BPF statistics on, the UDP 64 B A/B
rounds run (bench/udp_ab.py: many short paired rounds, for the one target whose gap is
smaller than these rounds' noise), and the per-packet cost against the trivial program is
measured (bench/per_packet.py). The scenarios are in bench/scenarios.py, iperf3 in
bench/iperf.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from agent.datapath import Datapath, open_datapath
from bench.bpf_stats import attached_program_id, cost, program_counters, statistics_enabled
from bench.common import Results, Settings, progress, spread
from bench.environment import Environment
from bench.iperf import TCP_1_STREAM, TCP_4_STREAMS, UDP_64B, Iperf, Measure, MeasurementFailed
from bench.per_packet import per_packet_cost
from bench.plots import plot_scaling
from bench.scenarios import (
    BASELINE,
    CONTROL,
    EgressTop,
    Iptables,
    NftSet,
    OneHashedSlotPerFlow,
    OneSlotPerFlow,
    Scenario,
    Trivial,
    loaded,
)
from bench.udp_ab import udp_ab_rounds

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
        """Ours (counting; with the cost rule count) against the trivial program, beside the
        floors of counting flows at all (one counter slot per flow, found in order or hashed)."""
        assert self.trivial is not None
        rules = self.settings.cost_rules
        floor, hashed_floor = OneSlotPerFlow(self.ifindex), OneHashedSlotPerFlow(self.ifindex)
        programs = {
            "trivial": self.trivial,
            "floor": floor,
            "hashed floor": hashed_floor,
            "counting": self.by_kind["egress-top", 0],
            "rules": self.by_kind["egress-top", rules],
        }
        with loaded([floor, hashed_floor]):
            return per_packet_cost(programs, self.ifindex, client_pid, self.settings, rules)

    def udp_ab_contenders(self) -> dict[str, Scenario]:
        """The UDP 64 B A/B rounds: no program first (every ratio is to it), then the control."""
        assert self.trivial is not None and self.control is not None
        return {
            "(a)": self.baseline,
            "(a')": self.control,
            "(t)": self.trivial,
            "(b)": self.by_kind["egress-top", 0],
        }

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
            udp_ab = udp_ab_rounds(plan.udp_ab_contenders(), iperf, settings.udp_ab_rounds) if cost else None
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
        cost_result["udp_ab"] = udp_ab
        written.append(results.write("datapath_cost", cost_result))
    if scaling:
        scaling_result = rule_scaling_result(plan, samples) | {"program_cost": costs}
        written.append(results.write("rule_scaling", scaling_result))
        written.append(plot_scaling(scaling_result, results.directory))
    return written
