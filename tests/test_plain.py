"""Plain output, row cells and units on fixed data: exact text."""

from __future__ import annotations

import pytest
from snapshots import DB, SNAPSHOT, WEB, WEB_STATS, flow

from agent.plain import fit, format_plain
from agent.rows import destination, sorted_stats
from agent.units import format_age, format_bits_per_second, format_bytes, format_rate, sparkline


@pytest.mark.parametrize(
    ("bytes_per_s", "text"),
    [
        (0, "0 b/s"),
        (101.5, "812 b/s"),
        (125, "1.0 Kb/s"),
        (150, "1.2 Kb/s"),
        (4_250_000, "34.0 Mb/s"),
        (137_500_000, "1.1 Gb/s"),
    ],
)
def test_bits_per_second(bytes_per_s: float, text: str) -> None:
    assert format_bits_per_second(bytes_per_s) == text


def test_other_units() -> None:
    assert [format_bytes(n) for n in (0, 512, 1536, 3.2 * 1024**2, 5 * 1024**4)] == [
        "0 B",
        "512 B",
        "1.5 KiB",
        "3.2 MiB",
        "5.0 TiB",
    ]
    assert [format_rate(r) for r in (0, 2.5, 42, 1500, 2_500_000)] == ["0", "2.5", "42", "1.5k", "2.5M"]
    assert [format_age(s) for s in (3, 125, 3720)] == ["3s", "2m05s", "1h02m"]
    assert sparkline([0, 1, 2, 4, 8], 5) == "▁▂▃▅█"
    assert sparkline([0, 0, 0], 5) == "▁▁▁"
    assert sparkline(list(range(40)), 30) == sparkline(list(range(10, 40)), 30)


def test_destination_brackets_ipv6_and_omits_ports_without_them() -> None:
    assert [destination(f) for f in WEB_STATS.flows] == ["198.51.100.7:443", "[2001:db8::1]:53"]
    icmp = flow(WEB, "198.51.100.1", 0, 1, 84, 84)
    assert destination(icmp) == "198.51.100.1"


def test_sorting() -> None:
    names = lambda sort, rev=False: [s.container.name for s in sorted_stats(SNAPSHOT, sort, rev)]  # noqa: E731
    assert names("rate") == ["web", DB.name]
    assert names("bytes") == [DB.name, "web"]
    assert names("name") == [DB.name, "web"]
    assert names("name", True) == ["web", DB.name]
    assert names("drops") == ["web", DB.name]


def test_plain_output_exact() -> None:
    lines = format_plain(SNAPSHOT, sort="rate", flows_per_container=5).splitlines()
    assert lines[0].endswith(
        "interval 1.0s containers 2 observed, 2 not egress 2.0 Mb/s flows 3/65536 (2 evicted)"
    )
    assert lines[1:] == [
        "CONTAINER                IMAGE                ADDRESSES          RATE        BYTES      PKT/S   FLOWS DROPS",
        "web (frontend) +1 shari… img:1                172.20.0.2         2.0 Mb/s    3.0 MiB    2.5k    2     7",
        "  -> 198.51.100.7:443             -                  external  tcp    1.6 Mb/s    1.9 MiB    2m05s  forwarded",
        "  -> [2001:db8::1]:53             -                  external  udp    400.0 Kb/s  58.6 KiB   2m05s  dropped",
        "a-database-with-a-very-… img:1                172.20.0.3         8.0 Kb/s    9.5 MiB    5.0     1     0",
        "NOT OBSERVED",
        "agent                    host network: its traffic crosses no veth",
        "sidecar                  shares the network namespace of web (counted there)",
    ]


def test_flows_per_container_limits_flow_lines() -> None:
    lines = format_plain(SNAPSHOT, sort="rate", flows_per_container=1).splitlines()
    assert sum(line.startswith("  -> ") for line in lines) == 1


def test_fit_truncates_with_ellipsis() -> None:
    assert fit("abcdef", 4) == "abc…" and fit("abc", 4) == "abc"
