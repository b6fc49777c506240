"""README's benchmark block is rewritten from the result files, and only the block."""

from __future__ import annotations

from pathlib import Path

from bench.common import Results
from bench.summary import README_BEGIN, README_END, update_readme

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


def test_the_block_between_the_markers_is_replaced_by_the_results(tmp_path: Path) -> None:
    results = Results(tmp_path / "results", {"started": "2026-12-01T00:00:00+00:00", "profile": "full"})
    row = {
        "label": "(b)",
        "udp_64B": {"ratio_to_baseline": 0.99},
        "tcp_1_stream": None,
        "tcp_4_streams": None,
    }
    results.write("datapath_cost", {"scenarios": [row], "per_packet": PER_PACKET})
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
    assert "| (b) counting: UDP 64 B throughput ≥ 0.98 of (a) | " in text and "UDP 64 B 0.99 | met |" in text
    assert "\n## " not in text  # sections nest under README's own heading


def test_a_readme_without_the_markers_is_left_alone(tmp_path: Path) -> None:
    results = Results(tmp_path / "results")
    readme = tmp_path / "README.md"
    readme.write_text("# title\n")
    assert not update_readme(results, readme)
    assert readme.read_text() == "# title\n"
