"""/metrics of the real agent: exact counts of real traffic, promtool's check, a real
Prometheus scraping it, drops by rule, removed containers' series going away, and what
serving them costs the agent in imports (run under tests/audit_imports.py)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import test_system_evasion as evasion
from lab import UPSTREAM_V4, UPSTREAM_V4_BLOCKME, UPSTREAM_V6, Lab, Upstream, wait_until
from prometheus_client.parser import text_string_to_metric_families
from runner import Agent, run_cli
from test_metrics_http import HEAVY_MODULES, get

from agent.datapath import PIN_DIR, our_filters

IPV4_UDP_OVERHEAD = 28  # IPv4 20 + UDP 8: the counts are IP bytes
GRACE_SECONDS = 3.0  # --metrics-grace for the test (the default is a minute)
Labels = frozenset[tuple[str, str]]

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None or shutil.which("promtool") is None,
    reason="Debian package prometheus (scripts/bootstrap.sh installs it)",
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


class MetricsAgent(Agent):
    def __init__(self, imports_log: Path) -> None:
        self.port = free_port()
        self.imports_log = imports_log
        super().__init__(
            "-i",
            "0.2",
            "--metrics",
            f"127.0.0.1:{self.port}",
            "--metrics-grace",
            str(GRACE_SECONDS),
            prefix=(sys.executable, str(Path(__file__).with_name("audit_imports.py")), str(imports_log)),
        )

    def imported(self) -> set[str]:
        return set(self.imports_log.read_text().splitlines())

    def scrape(self) -> str:
        return http_get(f"http://127.0.0.1:{self.port}/metrics")

    def samples(self) -> dict[tuple[str, Labels], float]:
        return {
            (sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(self.scrape())
            for sample in family.samples
        }


@pytest.fixture
def agent(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MetricsAgent]:
    monkeypatch.setenv("EGRESS_TOP_STATE_DIR", str(tmp_path / "state"))
    agent = MetricsAgent(tmp_path / "agent-imports.txt")
    try:
        agent.wait_ready()
        wait_until(lambda: "egress_top_flow_table_size" in agent.scrape(), timeout=10)  # polled once
        yield agent
    finally:
        code = agent.stop()
        run_cli("egress-agent", "cleanup")
        assert code == 0, agent.stderr_lines
        assert not our_filters() and not PIN_DIR.exists()


@pytest.fixture
def prometheus(tmp_path: Path, agent: MetricsAgent) -> Iterator[str]:
    """Debian's Prometheus on loopback, scraping the agent every second; its API's base URL."""
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        json.dumps(  # JSON is YAML
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {"job_name": "egress-top", "static_configs": [{"targets": [f"127.0.0.1:{agent.port}"]}]}
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            "prometheus",
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            return http_get(f"{base}/-/ready").startswith("Prometheus Server is Ready")
        except OSError:
            return False

    try:
        wait_until(ready, timeout=30)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def query(base: str, promql: str) -> list[dict]:  # type: ignore[type-arg]
    answer = json.loads(http_get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql})))
    assert answer["status"] == "success", answer
    return answer["data"]["result"]


def container_labels(name: str, **extra: str) -> Labels:
    return frozenset({"container": name, "compose_project": "", "compose_service": "", **extra}.items())


def test_counts_match_the_datagrams_sent_and_prometheus_answers(
    lab: Lab, upstream: Upstream, agent: MetricsAgent, prometheus: str
) -> None:
    sender = lab.container("metrics", network=lab.network())
    count, size, port = 7, 100, 5301
    sink = upstream.udp_sink(port)
    lab.send_udp(sender, UPSTREAM_V4, port, count=count, size=size)
    assert sink.wait_for(count, timeout=5) == (count, count * size)  # the receiver got every one

    udp_external = container_labels(sender.name, proto="udp", dst_kind="external")
    packets = ("egress_top_container_egress_packets_total", udp_external)
    wait_until(lambda: agent.samples().get(packets, 0) >= count, timeout=10)
    got = agent.samples()
    assert got[packets] == count
    assert got[("egress_top_container_egress_bytes_total", udp_external)] == count * (
        size + IPV4_UDP_OVERHEAD
    )
    assert got[("egress_top_attach_latency_seconds_count", frozenset())] >= 1  # its veth, at least

    text = agent.scrape()
    label_values = {value for _name, labels in agent.samples() for _key, value in labels}
    assert UPSTREAM_V4 not in label_values and str(port) not in label_values  # never a destination
    checked = subprocess.run(
        ["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30
    )
    assert checked.returncode == 0 and checked.stdout + checked.stderr == "", checked.stdout + checked.stderr

    promql = f'egress_top_container_egress_bytes_total{{container="{sender.name}",proto="udp",dst_kind="external"}}'
    result = wait_until(lambda: query(prometheus, promql), timeout=15)
    assert [float(series["value"][1]) for series in result] == [count * (size + IPV4_UDP_OVERHEAD)]


def test_drops_by_rule_match_the_datagrams_the_rule_cut(
    lab: Lab, upstream: Upstream, agent: MetricsAgent
) -> None:
    sender = lab.container("dropper", network=lab.network())
    port, size = 5302, 60
    sink = upstream.udp_sink(port)
    lab.send_udp(sender, UPSTREAM_V4_BLOCKME, port, count=2, size=size)
    assert sink.wait_for(2, timeout=5) == (2, 2 * size)  # control: it passes before the rule

    assert run_cli("egress-block", sender.name, UPSTREAM_V4_BLOCKME).returncode == 0
    rule_id = json.loads(run_cli("egress-rules", "--json").stdout.splitlines()[0])["id"]
    lab.send_udp(sender, UPSTREAM_V4_BLOCKME, port, count=5, size=size)
    dropped = (
        "egress_top_container_dropped_packets_total",
        container_labels(sender.name, rule_id=str(rule_id)),
    )
    wait_until(lambda: agent.samples().get(dropped, 0) >= 5, timeout=10)
    got = agent.samples()
    assert got[dropped] == 5
    assert got[("egress_top_container_dropped_bytes_total", dropped[1])] == 5 * (size + IPV4_UDP_OVERHEAD)
    assert sink.counts() == (2, 2 * size)  # the receiver got none of the five
    # the gauges come from the last interval, the rule hits from the scrape: wait for the interval
    in_force = {("egress_top_rules", frozenset()): 1, ("egress_top_containers_enforced", frozenset()): 1}
    wait_until(lambda: {key: agent.samples().get(key) for key in in_force} == in_force, timeout=5)


def test_drops_no_rule_decided_are_counted_exactly(lab: Lab, upstream: Upstream, agent: MetricsAgent) -> None:
    """IPv6 datagrams behind more extension headers than the parser follows, from a container
    with a port rule: dropped unparsed (fail closed), each one in the container's series."""
    web = lab.container("unparsed", network=lab.network(ipv6=True))
    sink = upstream.udp_sink(evasion.PORT, address="::")
    wait_until(lambda: web.exec_run(["ping", "-6", "-c", "1", "-W", "1", UPSTREAM_V6]).exit_code == 0, 15)
    sent = len(evasion.UNREACHED) * evasion.EACH
    sent_bytes = evasion.EACH * sum(40 + 8 * n + 15 for n in (7, 8, 12))  # IPv6, options, UDP + 7
    evasion.craft(lab, web, evasion.UNREACHED)
    assert sink.wait_for(sent, timeout=10)[0] == sent  # control: without a rule they all arrive

    rule = run_cli("egress-block", web.name, UPSTREAM_V6, "--port", str(evasion.PORT), "--proto", "udp")
    assert rule.returncode == 0, rule.stderr
    evasion.craft(lab, web, evasion.UNREACHED)
    dropped = ("egress_top_container_unparsed_dropped_packets_total", container_labels(web.name))
    wait_until(lambda: agent.samples().get(dropped, 0) >= sent, timeout=10)
    got = agent.samples()
    assert got[dropped] == sent
    assert got[("egress_top_container_unparsed_dropped_bytes_total", dropped[1])] == sent_bytes
    assert got[("egress_top_unknown_veth_held_packets_total", frozenset())] == 0  # no veth was unknown
    assert sink.counts()[0] == sent  # the receiver got none of the second batch


def test_removed_container_series_vanish_after_the_grace(
    lab: Lab, upstream: Upstream, agent: MetricsAgent
) -> None:
    net = lab.network()
    leaving, staying = lab.container("leaving", network=net), lab.container("staying", network=net)
    sink = upstream.udp_sink(5303)
    for container in (leaving, staying):
        lab.send_udp(container, UPSTREAM_V4, 5303, count=1, size=10)
    sink.wait_for(2, timeout=5)

    def has_series(name: str) -> bool:
        return f'container="{name}"' in agent.scrape()

    wait_until(lambda: has_series(leaving.name) and has_series(staying.name), timeout=10)
    leaving.remove(force=True)
    removed_at = time.monotonic()
    wait_until(lambda: not has_series(leaving.name), timeout=GRACE_SECONDS + 10)
    assert time.monotonic() - removed_at >= GRACE_SECONDS  # kept for the grace, not dropped at once
    assert has_series(staying.name)  # control: only the removed one's series went


def test_the_serving_agent_imports_no_http_tls_or_prometheus_client(agent: MetricsAgent) -> None:
    """The metrics are served by our own writer and server: the agent, scraped, never loads
    http.server, http.client, ssl, urllib.request, email or prometheus_client."""
    address = ("127.0.0.1", agent.port)
    status, headers, body = get(address, "/metrics")
    assert (
        status == "HTTP/1.1 200 OK" and headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    )
    families = {family.name for family in text_string_to_metric_families(body.decode())}
    assert {"egress_top_flow_table_size", "process_resident_memory_bytes", "process_cpu_seconds"} <= families
    assert get(address, "/metrics", method="HEAD")[2] == b""
    assert get(address, "/nothing")[0] == "HTTP/1.1 404 Not Found"
    assert agent.stop() == 0  # every import it made, shutdown's included, is in the log now
    imported = agent.imported()
    assert {"agent.cli.agent", "agent.metrics_http", "socketserver"} <= imported  # control: the hook saw them
    heavy = [name for name in imported for of in HEAVY_MODULES if name == of or name.startswith(f"{of}.")]
    assert heavy == []


def test_a_taken_port_is_refused_before_anything_is_attached(lab: Lab) -> None:
    lab.container("bystander", network=lab.network())  # a veth it would attach to
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        try:
            refused = run_cli("egress-agent", "run", "--metrics", f"127.0.0.1:{port}", timeout=30)
        except subprocess.TimeoutExpired:
            run_cli("egress-agent", "cleanup")
            raise
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr.startswith(f"egress-agent: cannot serve metrics on 127.0.0.1:{port}: ")
    assert "--metrics off" in refused.stderr and len(refused.stderr.splitlines()) == 1
    assert not our_filters() and not PIN_DIR.exists()
