"""The /metrics endpoint: a minimal HTTP/1.0-1.1 server for Prometheus' scrapes.

socketserver and a request-line parser instead of http.server (or prometheus_client's WSGI
server): those import http.client, email and, through prometheus_client, ssl, megabytes of
resident memory for one GET. Each connection is one request, answered and closed.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import socketserver
import threading
from collections.abc import Callable

from agent.metrics_text import CONTENT_TYPE

SCRAPE_PATHS = ("/metrics", "/")
MAX_LINE_BYTES = 8192  # a request or header line longer than this is a bad request
MAX_HEADERS = 100
CLIENT_TIMEOUT_SECONDS = 10.0  # a client that stalls mid-request loses its connection
PLAIN = "text/plain; charset=utf-8"
SocketAddress = tuple[str, int] | tuple[str, int, int, int]  # IPv6's has flow info and scope id


class MetricsServer:
    """Serves render()'s text from a daemon thread, from construction (the port is bound
    there: an OSError if it cannot be) until stop()."""

    def __init__(self, host: str, port: int, render: Callable[[], str]):
        family, _type, _proto, _name, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        self._render = render
        self._render_lock = threading.Lock()
        self._stopped = False
        self._server = _Server(family, address, self._body)
        # stop() wakes the accept loop through this pair: no polling while the agent idles
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread = threading.Thread(target=self._accept_loop, name="metrics-http", daemon=True)
        self._thread.start()

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._server.server_address[:2]
        return host, port

    def stop(self) -> None:
        """Returns once no scrape is rendering (one in progress finishes first), so the caller
        may close what render() reads; a connection still open after it is answered 503."""
        if self._wake_writer.fileno() == -1:
            return  # stopped already
        self._wake_writer.send(b"x")
        self._thread.join(timeout=5)
        self._server.server_close()
        self._wake_writer.close()
        self._wake_reader.close()
        with self._render_lock:
            self._stopped = True

    def _accept_loop(self) -> None:
        with selectors.DefaultSelector() as selector:
            selector.register(self._server, selectors.EVENT_READ)
            selector.register(self._wake_reader, selectors.EVENT_READ)
            while all(key.fileobj is self._server for key, _events in selector.select()):
                self._server.handle_request()  # accepts the waiting connection, a thread answers it

    def _body(self) -> bytes | None:
        with self._render_lock:  # one scrape renders at a time: collect() counts deltas since the last
            return None if self._stopped else self._render().encode()


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True  # a stalled client never holds the agent's exit
    allow_reuse_address = True  # a restarted agent rebinds at once (a listening port still refuses)

    def __init__(
        self, family: socket.AddressFamily, address: SocketAddress, body: Callable[[], bytes | None]
    ):
        self.address_family = family  # IPv6 listen addresses need an AF_INET6 socket
        self.body = body
        super().__init__(address, _ScrapeHandler)


class _ScrapeHandler(socketserver.StreamRequestHandler):
    timeout = CLIENT_TIMEOUT_SECONDS
    server: _Server

    def handle(self) -> None:
        try:
            request = self._read_request()
        except OSError:
            return  # the client went away or stalled past the timeout: nobody to answer
        if request is None:
            self._respond("400 Bad Request", b"bad request\n")
            return
        method, path = request
        if method not in ("GET", "HEAD"):
            self._respond("405 Method Not Allowed", b"use GET\n", extra_headers="Allow: GET, HEAD\r\n")
            return
        if path not in SCRAPE_PATHS:
            self._respond("404 Not Found", b"metrics are at /metrics\n")
            return
        try:
            body = self.server.body()
        except Exception:
            self._respond("500 Internal Server Error", b"the scrape failed: see the agent's log\n")
            raise  # socketserver writes the traceback to stderr
        if body is None:
            self._respond("503 Service Unavailable", b"the agent is stopping\n")
        else:
            self._respond("200 OK", body, CONTENT_TYPE, send_body=method == "GET")

    def _read_request(self) -> tuple[str, str] | None:
        """(method, path without the query) of "METHOD TARGET HTTP/1.x", once the headers
        (which nothing here needs) are read; None if it is not such a request."""
        line = self.rfile.readline(MAX_LINE_BYTES + 1)
        parts = line.decode("latin-1").split()
        if len(line) > MAX_LINE_BYTES or len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return None
        for _ in range(MAX_HEADERS):
            header = self.rfile.readline(MAX_LINE_BYTES + 1)
            if len(header) > MAX_LINE_BYTES:
                return None
            if header in (b"\r\n", b"\n", b""):  # the blank line ends them (or the client did)
                method, target, _version = parts
                return method, target.split("?", 1)[0]
        return None

    def _respond(
        self,
        status: str,
        body: bytes,
        content_type: str = PLAIN,
        send_body: bool = True,
        extra_headers: str = "",
    ) -> None:
        head = (
            f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
            f"{extra_headers}Connection: close\r\n\r\n"
        )
        with contextlib.suppress(OSError):  # the client went away: nobody to answer
            self.wfile.write(head.encode("ascii") + (body if send_body else b""))
