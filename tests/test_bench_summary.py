"""README's benchmark block is rewritten from the result files, and only the block."""

from __future__ import annotations

from pathlib import Path

from bench.common import Results, spread
from bench.markdown import DASH
from bench.summary import README_BEGIN, README_END, update_readme
from bench.targets import agent_target, start_targets, udp_ratio_target

PER_PACKET = {
    "repetitions": 1,
    "datagrams_per_run": 1000,
    "datagram_payload_bytes": 64,
    "cases": [
        {
            "case": "counting, 1,000 flows",
            "flows": 1000,
            "rules": 0,
            "trivial_ns_per_packet": {"median": 60.0, "min": 60.0, "max": 60.0, "n": 1},
            "ns_per_packet": {"median": 150.0, "min": 150.0, "max": 150.0, "n": 1},
            "ratio_to_trivial": {"median": 2.5, "min": 2.5, "max": 2.5, "n": 1},
        }
    ],
}


def udp_ab(ours: list[float], control: list[float]) -> dict:  # type: ignore[type-arg]
    """A/B rounds whose per-round ratios to (a) are `ours` for (b) and `control` for (a')."""
    rows = [
        {"label": label, "ratio_to_baseline": spread(ratios)}
        for label, ratios in (("(a)", [1.0] * len(ours)), ("(a')", control), ("(b)", ours))
    ]
    return {"rounds": len(ours), "seconds_per_run": 1, "contenders": rows}


def test_the_block_between_the_markers_is_replaced_by_the_results(tmp_path: Path) -> None:
    results = Results(tmp_path / "results", {"started": "2026-12-01T00:00:00+00:00", "profile": "full"})
    ab = udp_ab(ours=[0.97, 0.99, 0.99, 1.0, 1.02], control=[0.98, 0.99, 1.0, 1.01, 1.03])
    results.write("datapath_cost", {"scenarios": [], "per_packet": PER_PACKET, "udp_ab": ab})
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\nbefore\n\n{README_BEGIN}\nold figures 1.5 s\n{README_END}\n\nafter\n")

    assert update_readme(results, readme)

    text = readme.read_text()
    assert text.startswith("# title\n\nbefore\n\n" + README_BEGIN)
    assert text.endswith(README_END + "\n\nafter\n")
    assert "old figures" not in text
    assert (
        "| per packet, counting, 1,000 flows: ≤ 2.0x the trivial program | 2.50x (150 ns vs 60 ns) |" in text
    )
    assert (
        "| (b) counting: UDP 64 B throughput ≥ 0.98 of (a) | (b) 0.990 (IQR 0.990-1.000, min-max 0.970-1.020); "
        "control (a') 1.000 (IQR 0.990-1.010, min-max 0.980-1.030); 5 paired 1 s rounds | met |"
    ).replace("-", DASH) in text
    assert "\n## " not in text  # sections nest under README's own heading


def test_a_readme_without_the_markers_is_left_alone(tmp_path: Path) -> None:
    results = Results(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    assert not update_readme(results, readme)
    assert readme.read_text() == "# title\n"


def test_a_udp_gap_inside_the_controls_spread_is_called_noise() -> None:
    """Median 0.97 misses 0.98 by a point; the control's middle half reaches 3 points from 1."""
    noisy = udp_ratio_target(
        {"udp_ab": udp_ab(ours=[0.95, 0.96, 0.97, 0.98, 0.99], control=[0.95, 0.97, 1.0, 1.03, 1.05])}
    )
    assert (noisy.met, noisy.remark) == (
        False,
        "1 point short (within the noise floor: (a')'s IQR reaches 3 points from 1)",
    )
    quiet = udp_ratio_target({"udp_ab": udp_ab(ours=[0.95, 0.96, 0.97, 0.98, 0.99], control=[1.0] * 5)})
    assert (quiet.met, quiet.remark) == (False, "1 point short")
    absent = udp_ratio_target({"scenarios": []})
    assert (absent.judged, absent.measured) == (False, "not measured")


def cold_case(seconds: float) -> dict:  # type: ignore[type-arg]
    one_run = spread([seconds])
    parts = {"python_and_imports": one_run, "load_program": one_run, "rest_including_one_interval": 0.0}
    return {"seconds": one_run, "breakdown_seconds": parts}


def test_cold_start_is_judged_for_a_first_and_a_cached_compile() -> None:
    start = {
        "first_compile": cold_case(1.9),
        "cached_compile": cold_case(0.8),
        "cached_not_measured_because": None,
        "beside_agent_seconds": spread([0.4]),
    }
    rows = [verdict.row() for verdict in start_targets(start)]
    assert rows == [
        ["front end beside a running agent ≤ 0.5 s", "0.40 s median (max 0.40 s)", "met"],
        ["cold start (nothing loaded), cached compile ≤ 1.5 s", "0.80 s median (max 0.80 s)", "met"],
        [
            "cold start (nothing loaded), first compile, empty program cache ≤ 1.5 s",
            "1.90 s median (max 1.90 s)",
            "**missed**: 0.40 s over",
        ],
    ]
    without_cache = start | {"cached_compile": None, "cached_not_measured_because": "no cache in this build"}
    cached_row = start_targets(without_cache)[1].row()
    assert cached_row == [
        "cold start (nothing loaded), cached compile ≤ 1.5 s",
        "not measured",
        "not judged: no cache in this build",
    ]


def test_the_readme_block_puts_the_agents_measured_cost_beside_its_peers(tmp_path: Path) -> None:
    results = Results(tmp_path / "results", {"started": "2026-12-01T00:00:00+00:00", "profile": "full"})
    usage = {"VmRSS_mb": {"max": 47.4}, "cpu_percent_of_one_core": 0.84}
    results.write(
        "agent_cost",
        {
            "containers": 200,
            "real_flows": {"in_table": 100_000},
            "flows_moving_per_second": 1_000,
            "idle": {"VmRSS_mb": {"max": 38.2}, "cpu_percent_of_one_core": 0.41},
            "real": usage,
        },
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_BEGIN}\n{README_END}\n")

    assert update_readme(results, readme)

    text = readme.read_text()
    assert "#### The agent beside its peers" in text
    assert (
        "| egress-agent, this run: 200 containers, 100,000 flows, 1,000 moving a second "
        "| 47 MB VmRSS (empty table: 38 MB) | 0.8% of one core = 8 millicores (empty table: 0.4%) |"
    ) in text
    assert "| Cilium agent (per node) |" in text


def test_the_agent_verdict_carries_the_wake_control_and_says_why_only_on_a_miss() -> None:
    control = {"back_to_back_ms": {"median": 1.0}, "after_a_second_asleep_ms": {"median": 5.0}}
    usage = {"VmRSS_mb": {"max": 46.0}}
    agent = {
        "containers": 200,
        "real_flows": {"in_table": 100_000},
        "idle": {**usage, "cpu_percent_of_one_core": 1.2},
        "wake_control": control,
    }
    missed = agent_target({**agent, "real": {**usage, "cpu_percent_of_one_core": 1.9}})
    met = agent_target({**agent, "real": {**usage, "cpu_percent_of_one_core": 0.8}})
    assert (missed.met, met.met) == (False, True)
    assert missed.measured.endswith("; wake control 5.0x") and met.measured.endswith("; wake control 5.0x")
    assert "costs 5.0x as much CPU once a second as back to back" in missed.why
    assert met.why == ""
    assert (
        "wake control"
        not in agent_target(
            {**agent, "wake_control": None, "real": usage | {"cpu_percent_of_one_core": 1.9}}
        ).measured
    )
