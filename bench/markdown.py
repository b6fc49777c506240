"""Markdown for the benchmark reports: figures with their spread, tables, sections."""

from __future__ import annotations

from typing import Any

Data = dict[str, Any]
DASH = "\N{EN DASH}"  # ranges in the Markdown


def rate(value: float, metric: str) -> str:
    return f"{value / 1e9:.2f} Gb/s" if metric == "bits_per_second" else f"{value / 1e3:.0f} kpps"


def rate_range(stats: Data, metric: str) -> str:
    low = rate(stats["min"], metric).split()[0]
    return f"{rate(stats['median'], metric)} ({low}{DASH}{rate(stats['max'], metric)})"


def ratio_range(figure: Data | None) -> str:
    if figure is None:
        return "failed"
    per_round = figure["ratio_per_round"]
    rounds = (
        f" ({per_round['min']:.2f}{DASH}{per_round['max']:.2f})" if per_round and per_round["n"] > 1 else ""
    )
    return f"{figure['ratio_to_baseline']:.2f}{rounds}"


def ms_range(stats: Data) -> str:
    return f"{stats['median']:.1f} ({stats['min']:.1f}{DASH}{stats['max']:.1f})"


def points(ratio_gap: float) -> str:
    return f"{100 * ratio_gap:.0f} point{'s' if round(100 * ratio_gap) != 1 else ''}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def section(title: str, *paragraphs: str) -> list[str]:
    """A `## title` heading and its paragraphs, each followed by a blank line."""
    lines = [f"## {title}", ""]
    for paragraph in paragraphs:
        lines += [paragraph, ""]
    return lines
