"""prometheus_client as the oracle of our text writer (agent/metrics_text.py): the same
families built with its classes and rendered by its generate_latest must read the same."""

from __future__ import annotations

import math
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.metrics_text import Family, Histogram


def as_prometheus_client(family: Family | Histogram) -> Metric:
    """The same family built with prometheus_client's own classes (which name the samples)."""
    if isinstance(family, Histogram):
        return HistogramMetricFamily(family.name, family.help, buckets=family.buckets, sum_value=family.sum)
    made = {"counter": CounterMetricFamily, "gauge": GaugeMetricFamily}[family.kind]
    metric = made(family.name, family.help, labels=family.label_names)
    for values, value in family.series:
        metric.add_metric(values, value)
    return metric


class Collected:
    def __init__(self, metrics: Sequence[Metric]):
        self.metrics = metrics

    def collect(self) -> Sequence[Metric]:
        return self.metrics


def oracle_text(families: Sequence[Family | Histogram]) -> str:
    registry = CollectorRegistry()
    registry.register(Collected([as_prometheus_client(family) for family in families]))
    return generate_latest(registry).decode()


def assert_same_as_prometheus_client(ours: str, theirs: str) -> None:
    """Line for line the same (HELP, TYPE, names, labels, their order and escaping), values
    equal as numbers (theirs is 3.0 where ours is 3); and parsed, the same families."""
    assert len(ours.splitlines()) == len(theirs.splitlines()), (ours, theirs)
    for our_line, their_line in zip(ours.splitlines(), theirs.splitlines(), strict=True):
        if our_line.startswith("#"):
            assert our_line == their_line
            continue
        our_sample, our_value = our_line.rsplit(" ", 1)
        their_sample, their_value = their_line.rsplit(" ", 1)
        assert our_sample == their_sample
        assert same_number(float(our_value), float(their_value)), (our_line, their_line)
    parsed = list(text_string_to_metric_families(ours))
    expected = list(text_string_to_metric_families(theirs))
    assert [(m.name, m.type, m.documentation) for m in parsed] == [
        (m.name, m.type, m.documentation) for m in expected
    ]
    for got, want in zip(parsed, expected, strict=True):
        assert [(s.name, s.labels) for s in got.samples] == [(s.name, s.labels) for s in want.samples]
        assert all(same_number(a.value, b.value) for a, b in zip(got.samples, want.samples, strict=True))


def same_number(ours: float, theirs: float) -> bool:
    """Equal as Prometheus reads them (float64; its parser gives an int where the text has one)."""
    ours, theirs = float(ours), float(theirs)
    return ours == theirs or (math.isnan(ours) and math.isnan(theirs))
