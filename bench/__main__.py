"""sudo .venv/bin/python -m bench [--quick | --smoke] [--only NAME ...] [--results DIR]

Runs the benchmarks on this machine and writes bench/results/*.json, rule_scaling.png,
agent_cost.png and SUMMARY.md; a run into bench/results also rewrites README's block of
benchmark figures from them (nothing else writes either). Holds the machine lock (/tmp/ett-machine.lock) for the whole run, unless the
process that started it holds it already; keeps rules in a private temporary store.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from bench.common import DEFAULT_RESULTS, FULL, PROFILES, README, Results, Settings, machine_lock, progress
from bench.environment import Environment, environment
from bench.summary import update_readme, write_summary

STEPS = ("datapath", "scaling", "latency", "agent", "refresh", "startup")


def parse_arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[1])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer rounds and sizes (under 2 minutes)")
    size.add_argument("--smoke", action="store_true", help="one tiny iteration of each (for the test suite)")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=STEPS,
        default=list(STEPS),
        metavar="NAME",
        help=f"run only these: {', '.join(STEPS)}",
    )
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="where to write the results")
    parser.add_argument(
        "--summary", action="store_true", help="only rewrite SUMMARY.md from the result files there"
    )
    return parser.parse_args()


@contextlib.contextmanager
def private_state() -> Iterator[None]:
    """egress-block and the agent keep rules under EGRESS_TOP_STATE_DIR, the loader its
    compiled programs under EGRESS_TOP_PROGRAM_CACHE: never the machine's own."""
    with (
        tempfile.TemporaryDirectory(prefix="ettb-state-") as state,
        tempfile.TemporaryDirectory(prefix="ettb-program-cache-") as cache,
    ):
        os.environ["EGRESS_TOP_STATE_DIR"] = state
        os.environ["EGRESS_TOP_PROGRAM_CACHE"] = cache
        yield


def exit_on_signals() -> None:
    """SIGTERM and SIGHUP unwind like an exception, so every cleanup still runs."""
    for number in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(number, lambda signum, _frame: sys.exit(128 + signum))


def steps(
    env: Environment, settings: Settings, results: Results, only: set[str]
) -> dict[str, Callable[[], object]]:
    """Each benchmark, in the order they run (imported late: BCC is loaded by the first)."""
    from bench.agent_cost import agent_cost
    from bench.control_plane import read_and_aggregate
    from bench.latency import latencies
    from bench.startup import cold_start
    from bench.throughput import run_throughput

    chosen: dict[str, Callable[[], object]] = {}
    if only & {"datapath", "scaling"}:
        chosen["throughput"] = lambda: run_throughput(
            env, settings, results, cost="datapath" in only, scaling="scaling" in only
        )
    named = {
        "latency": lambda: latencies(env, settings, results),
        "agent": lambda: agent_cost(env, settings, results),
        "refresh": lambda: read_and_aggregate(settings, results),
        "startup": lambda: cold_start(settings, results),
    }
    chosen |= {name: step for name, step in named.items() if name in only}
    return chosen


def main() -> None:
    args = parse_arguments()
    if args.summary:
        results = Results(args.results)
        print(write_summary(results))
        if args.results.resolve() == DEFAULT_RESULTS.resolve():
            update_readme(results, README)
        return
    settings = PROFILES["smoke"] if args.smoke else PROFILES["quick"] if args.quick else FULL
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    results = Results(args.results, {"started": started_at, "profile": settings.name})
    exit_on_signals()
    started, durations = time.monotonic(), {}
    with machine_lock(), private_state(), environment() as env:
        for name, step in steps(env, settings, results, set(args.only)).items():
            progress(f"--- {name}")
            step_started = time.monotonic()
            step()
            durations[name] = round(time.monotonic() - step_started, 1)
            progress(f"{name}: {durations[name]:.0f} s")
    command = " ".join(["sudo .venv/bin/python -m bench", *sys.argv[1:]]).strip()
    results.write(
        "run",
        {
            "settings": settings.__dict__,
            "only": args.only,
            "seconds": round(time.monotonic() - started, 1),
            "step_seconds": durations,
            "command": command,
            "kernel": platform.release(),
            "cpus": os.cpu_count(),
        },
    )
    summary = write_summary(results)
    if args.results.resolve() == DEFAULT_RESULTS.resolve() and update_readme(results, README):
        progress(f"{README.name}: benchmark figures replaced by this run's")
    progress(f"done in {(time.monotonic() - started) / 60:.1f} min: {summary}")


if __name__ == "__main__":
    main()
