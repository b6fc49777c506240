"""The /metrics server (agent/metrics_http.py) over real loopback sockets, serving(), and
what serving costs in imports: none of http.server, http.client, ssl, urllib.request, email
or prometheus_client in the agent's process."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from agent.errors import UserError
from agent.metrics import SnapshotMetrics, serving
from agent.metrics_http import MAX_LINE_BYTES, MetricsServer
from agent.metrics_text import CONTENT_TYPE

BODY = "# HELP up Up.\n# TYPE up gauge\nup 1\n"
# what prometheus_client's package, or an HTTP stack of the standard library, would load
HEAVY_MODULES = ("ssl", "http.server", "http.client", "urllib.request", "email", "prometheus_client")
Answer = tuple[str, dict[str, str], bytes]  # status line, headers, body


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    served = MetricsServer("127.0.0.1", 0, lambda: BODY)
    try:
        yield served
    finally:
        served.stop()


def exchange(address: tuple[str, int], request: bytes) -> Answer:
    """Send request as it is; (status line, headers, body) of the answer, read to its close."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(address)
        client.sendall(request)
        answer = b""
        while chunk := client.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *header_lines = head.decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return status, headers, body


def get(address: tuple[str, int], target: str, method: str = "GET", version: str = "HTTP/1.1") -> Answer:
    return exchange(address, f"{method} {target} {version}\r\nHost: x\r\nAccept: */*\r\n\r\n".encode())


@pytest.mark.parametrize("target", ["/metrics", "/", "/metrics?name[]=up"])
def test_a_scrape_gets_the_text_with_prometheus_content_type(server: MetricsServer, target: str) -> None:
    status, headers, body = get(server.address, target)
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    assert int(headers["Content-Length"]) == len(body) and body == BODY.encode()
    assert headers["Connection"] == "close"


def test_http_1_0_and_the_standard_client_are_answered(server: MetricsServer) -> None:
    assert get(server.address, "/metrics", version="HTTP/1.0")[2] == BODY.encode()
    connection = http.client.HTTPConnection(*server.address, timeout=5)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert (response.status, response.read()) == (200, BODY.encode())
    finally:
        connection.close()


def test_head_has_the_headers_of_get_and_no_body(server: MetricsServer) -> None:
    status, headers, body = get(server.address, "/metrics", method="HEAD")
    assert status == "HTTP/1.1 200 OK" and headers["Content-Type"] == CONTENT_TYPE
    assert int(headers["Content-Length"]) == len(BODY.encode()) and body == b""


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /favicon.ico HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"GET /metrics/extra HTTP/1.1\r\n\r\n", "HTTP/1.1 404 Not Found"),
        (b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n", "HTTP/1.1 405 Method Not Allowed"),
        (b"hello\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics\r\n\r\n", "HTTP/1.1 400 Bad Request"),  # HTTP/0.9: no version
        (b"GET /metrics SPDY/3\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /" + b"m" * MAX_LINE_BYTES + b" HTTP/1.1\r\n\r\n", "HTTP/1.1 400 Bad Request"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"y" * MAX_LINE_BYTES + b"\r\n\r\n", "HTTP/1.1 400 Bad Request"),
    ],
)
def test_anything_but_a_scrape_is_refused_with_its_status(
    server: MetricsServer, request_bytes: bytes, status: str
) -> None:
    got_status, headers, body = exchange(server.address, request_bytes)
    assert got_status == status
    assert BODY.encode() not in body and int(headers["Content-Length"]) == len(body)
    if "405" in status:
        assert headers["Allow"] == "GET, HEAD"


def test_an_ipv6_listen_address_serves() -> None:
    try:
        served = MetricsServer("::1", 0, lambda: BODY)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    try:
        assert served.address[0] == "::1"
        assert get(served.address, "/metrics")[2] == BODY.encode()
    finally:
        served.stop()


def test_a_failed_render_is_a_500_and_the_next_scrape_is_served(capsys: pytest.CaptureFixture[str]) -> None:
    outcomes = iter([RuntimeError("map gone"), BODY])

    def render() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    served = MetricsServer("127.0.0.1", 0, render)
    try:
        assert get(served.address, "/metrics")[0] == "HTTP/1.1 500 Internal Server Error"
        assert get(served.address, "/metrics")[2] == BODY.encode()
    finally:
        served.stop()
    assert "RuntimeError: map gone" in capsys.readouterr().err  # the traceback is in the log


def test_stop_waits_for_a_scrape_in_progress_then_refuses_connections() -> None:
    rendering, release = threading.Event(), threading.Event()
    order: list[str] = []

    def slow_render() -> str:
        rendering.set()
        assert release.wait(timeout=10)
        order.append("rendered")
        return BODY

    served = MetricsServer("127.0.0.1", 0, slow_render)
    address = served.address
    answers: list[bytes] = []
    scrape = threading.Thread(target=lambda: answers.append(get(address, "/metrics")[2]))
    scrape.start()
    assert rendering.wait(timeout=5)
    stopper = threading.Thread(target=lambda: (served.stop(), order.append("stopped")))
    stopper.start()
    stopper.join(timeout=0.5)  # time for a stop that did not wait to return
    release.set()
    stopper.join(timeout=10)
    scrape.join(timeout=10)
    assert order == ["rendered", "stopped"]
    assert answers == [BODY.encode()]  # the scrape in progress got its whole answer
    with pytest.raises(ConnectionRefusedError):
        get(address, "/metrics")


def test_serving_refuses_a_taken_port_with_what_to_do() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        refused = f"cannot serve metrics on 127.0.0.1:{port}: .*--metrics off"
        with pytest.raises(UserError, match=refused), serving(("127.0.0.1", port), SnapshotMetrics()):
            pass


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# the agent's whole import graph, serving() scraped once; then what sys.modules holds
IMPORTS_OF_A_SERVING_AGENT = """
import json, socket, sys
import agent.cli.agent
from agent.metrics import SnapshotMetrics, serving
with serving(("127.0.0.1", PORT), SnapshotMetrics()):
    with socket.create_connection(("127.0.0.1", PORT), timeout=5) as client:
        client.sendall(b"GET /metrics HTTP/1.1\\r\\n\\r\\n")
        answer = b"".join(iter(lambda: client.recv(65536), b""))
print(json.dumps({"answer": answer.decode(), "modules": sorted(sys.modules)}))
"""


def test_a_serving_agent_imports_no_http_tls_or_prometheus_client() -> None:
    port = free_port()
    code = IMPORTS_OF_A_SERVING_AGENT.replace("PORT", str(port))
    ran = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    result = json.loads(ran.stdout)
    assert result["answer"].startswith("HTTP/1.1 200 OK\r\n")
    assert "\nprocess_resident_memory_bytes " in result["answer"]  # served the process series
    modules = set(result["modules"])
    assert {"agent.cli.agent", "agent.metrics_http", "socketserver"} <= modules  # control: it saw them
    heavy = [name for name in modules for of in HEAVY_MODULES if name == of or name.startswith(f"{of}.")]
    assert heavy == []
