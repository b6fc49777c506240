"""The host's sections of SUMMARY.md: flow-table refresh, the agent's own cost, attach and
block latencies, start-up times."""

from __future__ import annotations

from bench.markdown import DASH, Data, ms_range, section, table


def wake_factor(agent: Data) -> float | None:
    """The wake control's CPU once a second over its CPU back to back (medians), if measured."""
    control = agent.get("wake_control")
    if not control:
        return None
    return control["after_a_second_asleep_ms"]["median"] / control["back_to_back_ms"]["median"]


def refresh_section(refresh: Data) -> list[str]:
    lines = section(
        f"Flow-table refresh: Maps.read_flows + FlowAggregator.update, {refresh['containers']} containers",
        "Synthetic flows written into the real pinned map with BPF_MAP_UPDATE_BATCH (flow table "
        f"twice the flow count); milliseconds, median (min{DASH}max). 1%: every 100th flow moved "
        "since the previous refresh (a mostly idle table, the usual case); 100%: every flow moved.",
    )
    rows = []
    for count, level in refresh["levels"].items():
        one, every = level["1%"], level["100%"]
        rows.append(
            [
                f"{int(count):,}",
                f"{1000 * level['fill_seconds']:.0f}",
                ms_range(one["read_ms"]),
                ms_range(one["aggregate_ms"]),
                f"**{ms_range(one['refresh_ms'])}**",
                ms_range(every["aggregate_ms"]),
                ms_range(every["refresh_ms"]),
            ]
        )
    header = ["flows", "fill", "read", "aggregate (1%)", "refresh (1%)", "aggregate (100%)", "refresh (100%)"]
    return lines + table(header, rows)


def agent_section(agent: Data) -> list[str]:
    real = agent["real_flows"]
    lines = section(
        f"Agent cost: `{agent['command']}`",
        f"{agent['containers']} real sleeping containers (wanted {agent['containers_wanted']}; started in "
        f"{agent['container_start_seconds']:.0f} s), the program on each veth, a refresh every second. "
        "One agent, two phases in a row: an empty flow table; then real flows, created by UDP "
        f"datagrams from {real['senders']} of the containers ({real['in_table']:,} of the "
        f"{real['created']:,} sent were in the table; the entries, their timestamps and the "
        "moved-flow announcements are the datapath's), 1% of them sent again each second. The bench "
        "writes nothing into the maps. CPU from /proc/PID/stat (utime+stime over the phase), memory "
        "from /proc/PID/status every second (max shown); over time: `agent_cost.png`.",
    )
    moving = f"{agent['flows_moving_per_second']:,} moving each second"
    rows = []
    for phase, label in (
        ("idle", "empty flow table"),
        ("real", f"{real['in_table']:,} real flows, {moving}"),
    ):
        usage = agent[phase]
        rows.append(
            [
                label,
                f"{usage['seconds']:.0f} s",
                f"{usage['cpu_percent_of_one_core']:.1f}%",
                f"{usage['VmRSS_mb']['max']:.0f}",
                f"{usage['RssAnon_mb']['max']:.0f}",
                f"{usage['RssFile_mb']['max']:.0f}",
            ]
        )
    lines += table(["phase", "over", "CPU, % of one core", "VmRSS MB", "RssAnon MB", "RssFile MB"], rows)
    control = agent.get("wake_control")
    if control:
        hot, woken = control["back_to_back_ms"], control["after_a_second_asleep_ms"]
        lines += [
            "Wake control, beside the real phase (bench/wake_cost.py): a fixed piece of numpy and "
            f"Python work takes {hot['median']:.2f} ms of CPU back to back and {woken['median']:.2f} ms "
            f"(p25{DASH}p75 {woken['p25']:.2f}{DASH}{woken['p75']:.2f}) once a second after sleeping, "
            f"{wake_factor(agent):.1f}x: what this machine adds to any process that wakes once a second.",
            "",
        ]
    return [*lines, "![agent RSS and CPU over time](agent_cost.png)", ""]


def latency_section(latency: Data) -> list[str]:
    attach, block = latency["attach"], latency["block"]
    first = attach["start_call_to_first_counted_ms"]
    lines = [
        *section(f"Latencies (`{latency['agent']}` running)"),
        f"- Attach: {attach['tries']} containers started with `ping -c {attach['pings_per_try']} -i "
        f"{attach['ping_interval_seconds']}` as their command; the pings their flow counted against "
        f"the ones ping reports sent: **no packet missed in {attach['tries_with_no_packet_missed']}/"
        f"{attach['tries']} starts** (missed per start: median {attach['missed_packets']['median']:.0f}, "
        f"max {attach['missed_packets']['max']:.0f}).",
    ]
    if first:
        lines.append(
            f"- Container start call → its first packet counted: p50 {first['p50']:.0f} ms, p99 "
            f"{first['p99']:.0f} ms (that is Docker starting the container; the agent attaches on the "
            "veth's netlink event, before the container's process runs)."
        )
    lines += [
        f"- Block / unblock: {block['tries']} cycles of `egress-block` / `egress-unblock` (fast path: "
        f"the agent holds the datapath) while the container sends a UDP datagram every "
        f"{block['send_period_ms']:.0f} ms. The sender's flow counters are polled every "
        f"{block['poll_period_ms']:.1f} ms; a change is timed by the flow's last_seen_ns when the poll "
        "caught one packet alone, else by the poll. Negative: in force before the command returned. "
        "Packets forwarded after egress-block returned: "
        f"**{block['packets_forwarded_after_block_returned']}**.",
        "",
    ]
    rows = []
    for what, key, command in (
        ("egress-block returned → first packet dropped", "block_returned_to_first_drop_ms", "egress_block"),
        (
            "egress-unblock returned → first packet passing",
            "unblock_returned_to_first_pass_ms",
            "egress_unblock",
        ),
    ):
        figure, wall = block[key], block[f"{command}_command_seconds"]
        rows.append(
            [
                what,
                *([f"{figure[p]:.1f}" for p in ("p50", "p99", "min", "max")] if figure else ["-"] * 4),
                f"{1000 * wall['median']:.0f} ({1000 * wall['min']:.0f}{DASH}{1000 * wall['max']:.0f})",
            ]
        )
    return lines + table(["ms", "p50", "p99", "min", "max", f"command wall time, ms (min{DASH}max)"], rows)


def runs(count: int) -> str:
    return f"{count} run{'s' if count != 1 else ''}"


def _cold_start_line(what: str, case: Data) -> str:
    total, parts = case["seconds"], case["breakdown_seconds"]
    return (
        f"- {what}, {runs(total['n'])}: **{total['median']:.2f} s** median ({total['min']:.2f}{DASH}"
        f"{total['max']:.2f}). Where it goes (separate runs, medians): Python + imports "
        f"{parts['python_and_imports']['median']:.2f} s; loading the program "
        f"{parts['load_program']['median']:.2f} s; the rest (Docker inventory, attach, one 0.1 s "
        f"interval, exit) {parts['rest_including_one_interval']:.2f} s."
    )


def cold_start_section(start: Data) -> list[str]:
    cached = start.get("cached_compile")
    beside = start["beside_agent_seconds"]
    lines = [
        *section("Cold start", f"`{start['command']}` with nothing of ours loaded or pinned:"),
        _cold_start_line(
            "cold, first compile (empty program cache: BCC compiles in a child)", start["first_compile"]
        ),
        _cold_start_line("cold, cached compile (the program cache filled by a previous start)", cached)
        if cached
        else f"- cold, cached compile: not measured ({start['cached_not_measured_because']}).",
        "",
        f"The same command beside a running `egress-agent run` (program loaded and pinned), "
        f"{runs(beside['n'])}: **{beside['median']:.2f} s** median ({beside['min']:.2f}{DASH}"
        f"{beside['max']:.2f}).",
        "",
    ]
    return lines
