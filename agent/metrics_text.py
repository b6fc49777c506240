"""Metric families and the Prometheus text exposition format 0.0.4 they are scraped in.

Our own writer rather than prometheus_client's: importing that package loads its HTTP,
TLS, urllib and email dependencies (about 10 MB of the agent's resident memory) for a few
dozen lines of text. The output is what prometheus_client's generate_latest writes for the
same families (tests/test_metrics.py parses both and compares them), except that integer
values are written as exact integers: a byte counter past 2**53 stays exact in the text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Number = int | float
LabelValues = tuple[str, ...]


@dataclass
class Family:
    """A counter or a gauge: one value per set of label values. A counter's name is given
    without its _total suffix, which the text adds (as prometheus_client's families do)."""

    name: str
    kind: Literal["counter", "gauge"]
    help: str
    label_names: tuple[str, ...] = ()
    series: list[tuple[LabelValues, Number]] = field(default_factory=list)

    def add(self, label_values: Sequence[str], value: Number) -> None:
        if len(label_values) != len(self.label_names):
            raise ValueError(
                f"{self.name}: {len(self.label_names)} label values expected, got {label_values}"
            )
        self.series.append((tuple(label_values), value))

    def text_name(self) -> str:
        return f"{self.name}_total" if self.kind == "counter" else self.name


def counter(name: str, help_text: str, value: Number) -> Family:
    """A counter without labels."""
    return Family(name, "counter", help_text, series=[((), value)])


def gauge(name: str, help_text: str, value: Number) -> Family:
    """A gauge without labels."""
    return Family(name, "gauge", help_text, series=[((), value)])


@dataclass(frozen=True)
class Histogram:
    """A histogram without labels: (upper bound as written in le, cumulative count) per
    bucket, ascending, "+Inf" last; its _count is the +Inf bucket's."""

    name: str
    help: str
    buckets: tuple[tuple[str, int], ...]
    sum: float
    kind: Literal["histogram"] = "histogram"

    def text_name(self) -> str:
        return self.name


def render(families: Iterable[Family | Histogram]) -> str:
    """The families' HELP, TYPE and sample lines; labels in name order, as generate_latest."""
    lines = []
    for family in families:
        name = family.text_name()
        lines.append(f"# HELP {name} {_escape_help(family.help)}\n")
        lines.append(f"# TYPE {name} {family.kind}\n")
        if isinstance(family, Histogram):
            for bound, count in family.buckets:
                lines.append(_sample(f"{name}_bucket", (("le", bound),), count))
            lines.append(_sample(f"{name}_count", (), family.buckets[-1][1]))
            lines.append(_sample(f"{name}_sum", (), family.sum))
        else:
            for values, value in family.series:
                lines.append(_sample(name, tuple(zip(family.label_names, values, strict=True)), value))
    return "".join(lines)


def _sample(name: str, labels: tuple[tuple[str, str], ...], value: Number) -> str:
    if not labels:
        return f"{name} {format_value(value)}\n"
    label_text = ",".join(f'{key}="{escape_label_value(text)}"' for key, text in sorted(labels))
    return f"{name}{{{label_text}}} {format_value(value)}\n"


def escape_label_value(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def format_value(value: Number) -> str:
    """Floats as prometheus_client's floatToGoString writes them (+Inf, -Inf, NaN; an exponent
    from 1e+06 up), integers as they are."""
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    dot = text.find(".")
    if value > 0 and dot > 6:
        mantissa = f"{text[0]}.{text[1:dot]}{text[dot + 1 :]}".rstrip("0.")
        return f"{mantissa}e+{dot - 1:02d}"
    return text
