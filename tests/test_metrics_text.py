"""Our Prometheus text writer and process_* series against prometheus_client, the oracle:
escaping, special values, and ProcessCollector's own reading of the same /proc."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from metrics_oracle import assert_same_as_prometheus_client, oracle_text
from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.utils import floatToGoString

from agent.metrics_process import ProcessMetrics
from agent.metrics_text import Family, Histogram, counter, format_value, gauge, render

AWKWARD_LABELS = ["back\\slash", 'say "hi"', "two\nlines", 'all \\ " \n three', "", "café ✓", "{a=b},"]


def test_awkward_label_values_and_help_read_back_as_they_were() -> None:
    family = Family("awkward", "gauge", 'Help with a \\ backslash,\na newline and a "quote".', ("value",))
    for number, text in enumerate(AWKWARD_LABELS):
        family.add((text,), number)
    text = render([family])
    assert_same_as_prometheus_client(text, oracle_text([family]))
    (parsed,) = text_string_to_metric_families(text)
    assert parsed.documentation == family.help
    assert [sample.labels["value"] for sample in parsed.samples] == AWKWARD_LABELS
    assert 'awkward{value="all \\\\ \\" \\n three"} 3\n' in text  # the escapes, spelled out
    assert '# HELP awkward Help with a \\\\ backslash,\\na newline and a "quote".\n' in text


SPECIAL_VALUES = [
    float("nan"),
    float("inf"),
    float("-inf"),
    0.0,
    -0.0,
    1e-05,
    0.1,
    -2.5,
    999999.0,
    1234567.0,
    1e21,
    1.5e300,
    0,
    7,
    -3,
    2**53 + 1,  # past float precision: written exactly
]


def test_special_values_read_as_prometheus_client_writes_them() -> None:
    families = [gauge(f"value_{n}", "A value.", value) for n, value in enumerate(SPECIAL_VALUES)]
    assert_same_as_prometheus_client(render(families), oracle_text(families))


@pytest.mark.parametrize("value", [v for v in SPECIAL_VALUES if isinstance(v, float)])
def test_floats_are_spelled_as_float_to_go_string(value: float) -> None:
    assert format_value(value) == floatToGoString(value)


@pytest.mark.parametrize("value", [0, 7, -3, 1234567, 2**53 + 1, 2**64])
def test_integers_are_spelled_exactly_without_an_exponent(value: int) -> None:
    assert format_value(value) == str(value)
    assert int(format_value(value)) == value


def test_counters_histograms_and_empty_families_as_prometheus_client_writes_them() -> None:
    labelled = Family("requests", "counter", "Requests.", ("code", "path"))
    labelled.add(("200", "/metrics"), 5)
    labelled.add(("404", "/"), 1)
    families = [
        labelled,
        counter("plain", "No labels.", 3),
        Family("nothing_yet", "counter", "No series yet: HELP and TYPE only.", ("container",)),
        Histogram("latency_seconds", "A histogram.", (("0.001", 2), ("0.5", 3), ("+Inf", 4)), 3.0055),
        Histogram("idle_seconds", "No observations.", (("1.0", 0), ("+Inf", 0)), 0.0),
    ]
    text = render(families)
    assert_same_as_prometheus_client(text, oracle_text(families))
    assert 'requests_total{code="200",path="/metrics"} 5\n' in text
    assert "latency_seconds_count 4\nlatency_seconds_sum 3.0055\n" in text


def test_label_values_must_match_the_family_labels() -> None:
    family = Family("x", "gauge", "X.", ("a", "b"))
    with pytest.raises(ValueError, match="2 label values expected"):
        family.add(("only one",), 1)


def fake_proc(root: Path, fds: int) -> Path:
    """A /proc with a stat (boot time), self/stat, self/limits and self/fd of known values."""
    (root / "self" / "fd").mkdir(parents=True)
    (root / "stat").write_text("cpu  1 2 3 4\nintr 5\nbtime 1796000000\nprocesses 9\n")
    after_name = ["S", "1"] + [str(n) for n in range(2, 50)]
    after_name[11], after_name[12] = "1234", "567"  # utime, stime in ticks
    after_name[19], after_name[20], after_name[21] = "987654", "123456789", "4321"  # start, vsize, rss pages
    (root / "self" / "stat").write_text("4242 (egress (agent) x) " + " ".join(after_name) + "\n")
    (root / "self" / "limits").write_text(
        "Limit                     Soft Limit           Hard Limit           Units     \n"
        "Max cpu time              unlimited            unlimited            seconds   \n"
        "Max open files            1048576              1048576              files     \n"
    )
    for fd in range(fds):
        (root / "self" / "fd" / str(fd)).touch()
    return root


def prometheus_client_text(collector: ProcessCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_process_series_are_process_collectors_for_the_same_proc(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, fds=7)
    ours = render(ProcessMetrics(proc).collect())
    theirs = prometheus_client_text(ProcessCollector(proc=str(proc), registry=None))
    assert ours == theirs  # byte for byte: these values are floats on both sides
    assert "process_open_fds 7.0\n" in ours and "process_max_fds 1.048576e+06\n" in ours
    values = {sample.name: sample.value for f in text_string_to_metric_families(ours) for sample in f.samples}
    ticks, page = os.sysconf("SC_CLK_TCK"), os.sysconf("SC_PAGE_SIZE")
    assert values["process_cpu_seconds_total"] == pytest.approx((1234 + 567) / ticks)
    assert values["process_start_time_seconds"] == pytest.approx(1796000000 + 987654 / ticks)
    assert values["process_resident_memory_bytes"] == 4321 * page
    assert values["process_virtual_memory_bytes"] == 123456789


def test_no_proc_no_process_series(tmp_path: Path) -> None:
    assert ProcessMetrics(tmp_path / "none").collect() == []
    assert prometheus_client_text(ProcessCollector(proc=str(tmp_path / "none"), registry=None)) == ""


def test_process_series_of_this_process_match_process_collectors() -> None:
    before = {f.name: f.series[0][1] for f in ProcessMetrics().collect()}
    theirs = {
        family.name: family.samples[0].value
        for family in text_string_to_metric_families(prometheus_client_text(ProcessCollector(registry=None)))
    }
    after = {f.name: f.series[0][1] for f in ProcessMetrics().collect()}
    assert list(before) == [
        "process_virtual_memory_bytes",
        "process_resident_memory_bytes",
        "process_start_time_seconds",
        "process_cpu_seconds",
        "process_open_fds",
        "process_max_fds",
    ]
    assert list(theirs) == list(before)  # the parser names a counter family without _total too
    for name in ("process_start_time_seconds", "process_max_fds", "process_open_fds"):
        assert before[name] == theirs[name] == after[name]
    assert before["process_cpu_seconds"] <= theirs["process_cpu_seconds"] <= after["process_cpu_seconds"]
    status = Path("/proc/self/status").read_text().splitlines()
    own_rss_kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))
    assert theirs["process_resident_memory_bytes"] == pytest.approx(own_rss_kb * 1024, rel=0.1)
    assert before["process_resident_memory_bytes"] == pytest.approx(own_rss_kb * 1024, rel=0.1)
