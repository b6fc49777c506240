"""The datapath's sections of SUMMARY.md: throughput with and without our program, the UDP
64 B A/B rounds against their noise floor, per-packet cost, scaling with rules."""

from __future__ import annotations

from bench.markdown import DASH, Data, ms_range, rate_range, ratio_range, section, table

MEASURES = (
    ("tcp_1_stream", "bits_per_second", "TCP 1 stream"),
    ("tcp_4_streams", "bits_per_second", "TCP 4 streams"),
    ("udp_64B", "packets_per_second", "UDP 64 B"),
)


def program_share(cost: Data | None, rules: int | str, measure: str) -> Data | None:
    """Our program's run time per packet and share of the sending CPU (kernel BPF statistics)."""
    return ((cost or {}).get("program_cost") or {}).get(str(rules), {}).get(measure)


def datapath_section(cost: Data) -> list[str]:
    lines = section(
        f"Datapath cost ({cost['rules']:,} non-matching rules where rules apply)",
        "iperf3 from a container on a Docker bridge network to a server in the `upstream` netns "
        "(the host's iperf3 in the container's netns: packets leave through its eth0 and host-side "
        "veth, then bridge, forwarding and NAT). (t) is a trivial tc program (`return TC_ACT_OK`) "
        "where ours goes; (a') is a second no-program scenario in the same rounds: how far apart "
        "two identical setups land, i.e. the noise on a ratio.",
    )
    absolute, ratios = [], []
    for row in cost["scenarios"]:
        name = f"{row['label']} {row['scenario']}"
        loss = f"{row['udp_64B']['loss_percent']['median']:.1f}%" if row["udp_64B"] else "-"
        absolute.append(
            [
                name,
                *(rate_range(row[m][metric], metric) if row[m] else "failed" for m, metric, _ in MEASURES),
                loss,
            ]
        )
        ratios.append([name, *(ratio_range(row[m]) for m, _, _ in MEASURES)])
    titles = [title for _, _, title in MEASURES]
    lines += table(["", *titles, "UDP loss"], absolute)
    lines += ["Ratio to (a):", ""]
    lines += table(["", *titles], ratios)
    shares = []
    for rules, what in (
        ("trivial", "trivial program"),
        (0, "counting"),
        (cost["rules"], f"{cost['rules']:,} rules"),
    ):
        udp, tcp = program_share(cost, rules, "udp_64B"), program_share(cost, rules, "tcp_1_stream")
        if udp and tcp:
            shares.append(
                f"{what}: {udp['ns_per_run']:.0f} ns per 64 B datagram = {100 * udp['cpu_share']:.1f}% of "
                f"the sending CPU, {tcp['ns_per_run']:.0f} ns per TCP super-packet = "
                f"{100 * tcp['cpu_share']:.1f}%"
            )
    if shares:
        lines += [
            "Our program's own run time, from the kernel's BPF statistics (one extra run each, "
            f"outside the rounds): {'; '.join(shares)}. With the sending CPU saturated, that share is "
            "the throughput it costs.",
            "",
        ]
    return lines


def _floor_cells(case: Data, floor: str) -> list[str]:
    """ns and ratio of one floor program, "-" where a run predates it."""
    if f"{floor}_ns_per_packet" not in case:
        return ["-", "-"]
    return [ms_range(case[f"{floor}_ns_per_packet"]), _ratio_range(case[f"{floor}_ratio_to_trivial"])]


def per_packet_section(cost: Data) -> list[str]:
    per_packet = cost.get("per_packet")
    if not per_packet:
        return []
    lines = section(
        "Per-packet cost against a trivial tc program (kernel BPF statistics)",
        "run_time_ns / run_cnt of the program on the client's veth (kernel.bpf_stats_enabled on, "
        "restored afterwards), our program, a trivial one (`return TC_ACT_OK`, same hook) and two "
        "floors of counting flows at all (one 64-byte per-CPU counter slot per flow, no atomics, found "
        "by the destination port, which the bench's flows count up so the lines come in order, or by "
        "a hash of it, as a design that finds a flow from its 5-tuple must) in "
        f"turn, {per_packet['repetitions']} round(s) of {per_packet['datagrams_per_run']:,} UDP "
        f"datagrams of {per_packet['datagram_payload_bytes']} B each, sent round-robin over the "
        "flows (TTL 1: dropped by the host after the veth). Every figure includes the statistics' "
        f"own two clock reads per run. ns per packet, median (min{DASH}max); ratios to the trivial "
        "program.",
    )
    rows = [
        [
            case["case"] + (f" ({case['rules']:,} rules)" if case["rules"] else ""),
            ms_range(case["trivial_ns_per_packet"]),
            *(_floor_cells(case, "floor") + _floor_cells(case, "hashed_floor")),
            ms_range(case["ns_per_packet"]),
            f"**{_ratio_range(case['ratio_to_trivial'])}**",
        ]
        for case in per_packet["cases"]
    ]
    header = [
        "",
        "trivial program, ns",
        "one slot per flow (in order), ns",
        "its ratio",
        "one hashed slot per flow, ns",
        "its ratio",
        "egress-top, ns",
        "ratio",
    ]
    return lines + table(header, rows)


def _ratio_range(ratio: Data) -> str:
    return f"{ratio['median']:.2f}x ({ratio['min']:.2f}{DASH}{ratio['max']:.2f})"


def scaling_section(scaling: Data) -> list[str]:
    lines = section(
        "Throughput ratio vs number of non-matching rules",
        "egress-top: /32 prefixes (half block, half allow) in the LPM trie under the container's "
        "slot, 3 lookups per packet; iptables (nf_tables backend): one rule per /32 in a chain "
        "jumped to from DOCKER-USER, matched one by one; nftables: one rule `ip daddr @set drop` on "
        "the forward hook, the addresses in a hash set. Ratio to no program, same run.",
    )
    kinds = ("egress-top", "iptables", "nftables")
    writes = scaling.get("sync_policy_seconds") or {}
    rows = []
    for count in scaling["rule_counts"]:
        level = scaling["levels"][str(count)]
        cells = [
            ratio_range(level.get(kind, {}).get(m)) for m in ("tcp_1_stream", "udp_64B") for kind in kinds
        ]
        udp = program_share(scaling, count, "udp_64B")
        write = writes.get(str(count))
        rows.append(
            [
                f"{count:,}",
                *cells,
                f"{udp['ns_per_run']:.0f} ns ({100 * udp['cpu_share']:.1f}%)" if udp else "-",
                f"{write['median']:.2f} s" if write else "-",
            ]
        )
    lines += table(
        [
            "rules",
            *(f"{kind} TCP" for kind in kinds),
            *(f"{kind} UDP 64 B" for kind in kinds),
            "our program per datagram (CPU share)",
            "Maps.sync_policy",
        ],
        rows,
    )
    lines += ["![throughput ratio vs rules](rule_scaling.png)", ""]
    return lines


def quartiles(stats: Data, digits: int = 3) -> str:
    """Median, the middle half (IQR) and min-max of a spread."""
    low, high = f"{stats['p25']:.{digits}f}", f"{stats['p75']:.{digits}f}"
    return (
        f"{stats['median']:.{digits}f} (IQR {low}{DASH}{high}, "
        f"min{DASH}max {stats['min']:.{digits}f}{DASH}{stats['max']:.{digits}f})"
    )


def udp_ab_section(cost: Data) -> list[str]:
    ab = cost.get("udp_ab")
    if not ab:
        return []
    lines = section(
        "UDP 64 B: our program against none, beside the noise floor",
        f"{ab['rounds']} alternating rounds in the same run: each round one {ab['seconds_per_run']} s "
        f"iperf3 run (UDP, {ab['datagram_bytes']}-byte datagrams, no rate limit) of every setup "
        "below, the order rotated from round to round. Ratio: each run over the same round's (a) "
        "(paired, so drift between rounds cancels); median of the rounds, IQR (the middle half of "
        f"the rounds) and min{DASH}max. (a') is a second no-program setup: its ratio to (a) is the "
        "noise floor; a gap smaller than its spread is not a measured gap.",
    )
    rows = [
        [
            f"{row['label']} {row['scenario']}",
            rate_range(row["packets_per_second"], "packets_per_second")
            if row["packets_per_second"]
            else "failed",
            quartiles(row["ratio_to_baseline"]) if row["ratio_to_baseline"] else "failed",
            str(row["failed_runs"]),
        ]
        for row in ab["contenders"]
    ]
    return lines + table(["", f"delivered, median (min{DASH}max)", "ratio to (a)", "failed runs"], rows)
