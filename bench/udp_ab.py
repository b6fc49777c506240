"""UDP 64 B throughput of our program against no program, next to its own noise floor.

Many short alternating rounds in one run: each round gives every contender (no program,
a second no program as the control, the trivial tc program, egress-top counting) one
iperf3 run of UDP 64-byte datagrams as fast as they go, the order rotated from round to
round so that no contender always runs first or after the same one. Each run is divided
by the same round's no-program run (a paired ratio: the machine's drift between rounds
cancels); each contender's figure is the median of those ratios with their quartiles.
The control's ratio is what two identical setups differ by: a gap to the target smaller
than the control's spread is not a measured gap.
"""

from __future__ import annotations

from typing import Any

from bench.common import progress, spread
from bench.iperf import UDP_64B, Iperf, MeasurementFailed
from bench.scenarios import Scenario

AB_SECONDS = 1  # one iperf3 run (whole seconds): short, so that many rounds fit


def _delivered(iperf: Iperf, scenario: Scenario) -> float | None:
    """Datagrams per second the server got in one run, None when the run failed."""
    scenario.setup()
    try:
        return iperf.run(UDP_64B, seconds=AB_SECONDS)["packets_per_second"]
    except MeasurementFailed as failure:
        progress(f"udp a/b {scenario.name}: {failure}")
        return None
    finally:
        scenario.teardown()


def udp_ab_rounds(contenders: dict[str, Scenario], iperf: Iperf, rounds: int) -> dict[str, Any]:
    """contenders: label -> scenario, the first the no-program baseline every ratio is to."""
    labels = list(contenders)
    delivered: dict[str, list[float | None]] = {label: [] for label in labels}
    for round_number in range(rounds):
        shift = round_number % len(labels)
        for label in labels[shift:] + labels[:shift]:
            delivered[label].append(_delivered(iperf, contenders[label]))
        if (round_number + 1) % 10 == 0 or round_number + 1 == rounds:
            progress(f"udp a/b: {round_number + 1}/{rounds} rounds")
    baseline = delivered[labels[0]]
    rows = []
    for label in labels:
        runs = delivered[label]
        per_round = [run / base if run and base else None for run, base in zip(runs, baseline, strict=True)]
        paired = [ratio for ratio in per_round if ratio is not None]
        done = [run for run in runs if run is not None]
        rows.append(
            {
                "label": label,
                "scenario": contenders[label].name,
                "kind": contenders[label].kind,
                "packets_per_second": spread(done) if done else None,
                "ratio_to_baseline": spread(paired) if paired else None,
                "ratio_per_round": [
                    run / base if run and base else None for run, base in zip(runs, baseline, strict=True)
                ],
                "failed_runs": len(runs) - len(done),
            }
        )
    return {"rounds": rounds, "seconds_per_run": AB_SECONDS, "datagram_bytes": 64, "contenders": rows}
