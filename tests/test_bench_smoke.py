"""One small run of every benchmark (`python -m bench --smoke`), so bench/ cannot rot, and
the regression check on the datapath's per-packet cost. The run happens once per module
(whichever test comes first); each test asserts on what that run measured. The figures
themselves come from one `sudo make bench` run (bench/results/)."""

from __future__ import annotations

import importlib.util
import json
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import docker
import pytest

from agent.datapath import our_filters, pins_exist

REPO = Path(__file__).resolve().parent.parent
RECORDED = REPO / "bench" / "results"
REGRESSION_FACTOR = 2.0  # fail when ours / trivial doubles against the recorded run

pytestmark = [pytest.mark.system, pytest.mark.timeout(600)]  # the first test waits for the run


class SmokeRun:
    def __init__(self, directory: Path):
        self.directory = directory

    def load(self, name: str) -> dict[str, Any]:
        return json.loads((self.directory / f"{name}.json").read_text())

    def per_packet_cases(self) -> dict[str, dict[str, Any]]:
        return {case["case"]: case for case in self.load("datapath_cost")["per_packet"]["cases"]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> SmokeRun:
    # The bench takes the machine lock itself, or runs under the session's when it holds it.
    results = tmp_path_factory.mktemp("bench-smoke")
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--results", str(results)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return SmokeRun(results)


def test_per_packet_cost_is_measured_on_every_datagram(smoke: SmokeRun) -> None:
    """The kernel's run count of the program on the veth covers every datagram the sender
    got out, for the trivial program and for ours: the program was on the path."""
    cases = smoke.per_packet_cases()
    wanted = smoke.load("datapath_cost")["per_packet"]["datagrams_per_run"]
    assert set(cases) == {"counting, 1 flow", "counting, 1,000 flows", "counting + rules, 1,000 flows"}
    for case in cases.values():
        for round_ in case["rounds"]:
            for program in ("trivial", "ours"):
                measured = round_[program]
                # a stray packet of the container's own (ARP) may add a run, never remove one
                assert measured["datagrams_sent"] <= measured["runs"] <= measured["datagrams_sent"] + 20, case
                assert measured["datagrams_sent"] >= 0.99 * wanted, case
        # ours does more than `return TC_ACT_OK`
        assert case["ns_per_packet"]["median"] > case["trivial_ns_per_packet"]["median"], case


def test_per_packet_cost_has_not_doubled(smoke: SmokeRun) -> None:
    """The regression check: ns per packet relative to the trivial program of the same run,
    against the same ratio in the recorded `sudo make bench` run."""
    recorded = json.loads((RECORDED / "datapath_cost.json").read_text()).get("per_packet")
    if not recorded:
        pytest.skip("bench/results/ holds no per-packet figures yet: record them with `sudo make bench`")
    reference = {case["case"]: case["ratio_to_trivial"]["median"] for case in recorded["cases"]}
    measured = {name: case["ratio_to_trivial"]["median"] for name, case in smoke.per_packet_cases().items()}
    assert set(measured) == set(reference)
    doubled = {
        name: f"{ratio:.2f}x the trivial program, recorded {reference[name]:.2f}x"
        for name, ratio in measured.items()
        if ratio > REGRESSION_FACTOR * reference[name]
    }
    assert not doubled, doubled


def test_throughput_scenarios_and_program_costs(smoke: SmokeRun) -> None:
    cost = smoke.load("datapath_cost")
    labels = [row["label"] for row in cost["scenarios"]]
    assert labels == ["(a)", "(t)", "(b)", "(c)", "(d)", "(e)", "(a')"]
    for row in cost["scenarios"]:
        for measure, metric in (("tcp_1_stream", "bits_per_second"), ("udp_64B", "packets_per_second")):
            assert row[measure]["failed_runs"] == 0, row
            assert row[measure][metric]["median"] > 0, row
    # the BPF statistics saw a run for each UDP datagram iperf3 sent (at least those delivered)
    assert set(cost["program_cost"]) == {"trivial", "0", "10000"}
    rows = {row["label"]: row for row in cost["scenarios"]}
    for key, label in (("trivial", "(t)"), ("0", "(b)"), ("10000", "(c)")):
        udp = cost["program_cost"][key]["udp_64B"]
        assert udp["runs"] > 0.5 * rows[label]["udp_64B"]["packets_per_second"]["median"], (key, udp)

    scaling = smoke.load("rule_scaling")
    for level in scaling["levels"].values():
        assert set(level) == {"egress-top", "iptables", "nftables"}
    # 10,000 rules matched one by one cost iptables more than a hash set costs nftables
    at_10k = {
        kind: figures["udp_64B"]["ratio_to_baseline"] for kind, figures in scaling["levels"]["10000"].items()
    }
    assert at_10k["iptables"] < at_10k["nftables"], at_10k
    assert (smoke.directory / "rule_scaling.png").read_bytes().startswith(b"\x89PNG")


def test_udp_ab_rounds_pair_every_contender_with_the_baseline(smoke: SmokeRun) -> None:
    ab = smoke.load("datapath_cost")["udp_ab"]
    rounds = smoke.load("run")["settings"]["udp_ab_rounds"]
    assert ab["rounds"] == rounds
    rows = {row["label"]: row for row in ab["contenders"]}
    assert list(rows) == ["(a)", "(a')", "(t)", "(b)"]
    assert [rows[label]["kind"] for label in rows] == ["baseline", "baseline", "trivial", "egress-top"]
    for row in rows.values():
        assert row["failed_runs"] == 0, row
        assert row["packets_per_second"]["n"] == row["ratio_to_baseline"]["n"] == rounds, row
        assert row["packets_per_second"]["min"] > 0, row
        # the figure is the median of the round-by-round ratios it lists
        assert row["ratio_to_baseline"]["median"] == statistics.median(row["ratio_per_round"]), row
    assert rows["(a)"]["ratio_per_round"] == [1.0] * rounds


def test_latencies(smoke: SmokeRun) -> None:
    latency = smoke.load("latency")
    attach, block = latency["attach"], latency["block"]
    # every ping of every new container was counted: the program was on before it ran
    assert attach["pings_sent"] == attach["tries"] * attach["pings_per_try"]
    assert attach["pings_counted"] == attach["pings_sent"]
    assert attach["tries_with_no_packet_missed"] == attach["tries"]
    # every block dropped and every unblock let through (the control), none passed in between
    assert block["cycles_without_a_change_seen"] == 0
    assert block["packets_forwarded_after_block_returned"] == 0


def test_agent_cost_and_refresh(smoke: SmokeRun) -> None:
    agent = smoke.load("agent_cost")
    settings = smoke.load("run")["settings"]
    # every flow the containers sent was in the agent's table: the datapath created them all
    assert agent["real_flows"]["created"] >= settings["agent_flows"]
    assert agent["real_flows"]["in_table"] == agent["real_flows"]["created"]
    assert agent["flows_moving_per_second"] == agent["real_flows"]["created"] // 100
    assert set(agent["phases"]) == {"idle", "real"}
    for phase in ("idle", "real"):
        assert agent[phase]["VmRSS_mb"]["min"] > 10, phase  # a live Python process, sampled
    # one sample a second across the phases, and the plot of it
    assert len(agent["series"]) >= int(agent["real"]["seconds"] + agent["idle"]["seconds"])
    assert (smoke.directory / "agent_cost.png").read_bytes().startswith(b"\x89PNG")
    control = agent["wake_control"]  # timed beside the real phase, once a second
    assert control["back_to_back_ms"]["n"] == 50 and control["after_a_second_asleep_ms"]["n"] >= 2
    assert min(control["back_to_back_ms"]["min"], control["after_a_second_asleep_ms"]["min"]) > 0

    refresh = smoke.load("read_and_aggregate")["levels"]
    for count, level in refresh.items():
        assert level["1%"]["flows_read"] == level["100%"]["flows_read"] == int(count)


def test_cold_start_with_an_empty_and_a_filled_program_cache(smoke: SmokeRun) -> None:
    start = smoke.load("cold_start")
    first, cached = start["first_compile"], start["cached_compile"]
    assert first["seconds"]["n"] == smoke.load("run")["settings"]["cold_starts"]
    if importlib.util.find_spec("agent.datapath.program_cache") is None:
        assert cached is None and start["cached_not_measured_because"]
        pytest.skip("this build has no compiled-program cache: only the first compile was measured")
    # the cache filled by the first start loads the program without compiling it
    assert start["cached_not_measured_because"] is None
    load = {
        case: start[case]["breakdown_seconds"]["load_program"]["median"]
        for case in ("first_compile", "cached_compile")
    }
    assert load["cached_compile"] < load["first_compile"], load


def test_summary_and_nothing_left_behind(smoke: SmokeRun) -> None:
    summary = (smoke.directory / "SUMMARY.md").read_text()
    for section in ("## Targets", "## Datapath cost", "## Per-packet cost", "## Agent cost", "## Cold start"):
        assert section in summary
    assert smoke.load("run")["run"]["profile"] == "smoke"
    # kernel.bpf_stats_enabled is back to what it was before the bench turned it on
    stats = smoke.load("datapath_cost")["per_packet"]["bpf_stats_enabled"]
    assert stats["after"] == stats["before"]

    # nothing of the bench is left: containers, network, netns, filters, pins, firewall rules
    client = docker.from_env()
    assert not [c.name for c in client.containers.list(all=True) if c.name.startswith("ettb-")]
    assert not client.networks.list(names=["ettb-net"])
    assert "ettb-up" not in subprocess.run(["ip", "netns"], capture_output=True, text=True).stdout
    assert not our_filters() and not pins_exist()
    assert "ettb" not in subprocess.run(["iptables", "-S"], capture_output=True, text=True).stdout
    assert "ettb" not in subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
