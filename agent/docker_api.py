"""The few Docker Engine API calls the inventory makes, over the engine's unix socket.

The docker SDK pulls in requests and urllib3: ~75 ms of every command's start, more
than a whole egress-block may take. The inventory needs six GETs, so they are made
here as HTTP/1.0 requests (the engine then sends no chunked encoding and closes the
connection after the body, or streams events until we close). The methods have the
SDK's names and results, so an SDK client (DOCKER_HOST tcp:// or ssh://) works too.
"""

from __future__ import annotations

import contextlib
import json
import socket
import urllib.parse
from collections.abc import Iterator
from typing import Any

DEFAULT_SOCKET = "/var/run/docker.sock"
MAX_HEADER_BYTES = 64 * 1024


class EngineError(Exception):
    """The engine answered with an error status; status_code as the SDK's APIError has it."""

    def __init__(self, status_code: int, message: str):
        super().__init__(f"{status_code}: {message}")
        self.status_code = status_code


class EventStream:
    """Decoded events as they arrive; close() from another thread ends the iteration."""

    def __init__(self, sock: socket.socket, body: Any):
        self._sock = sock
        self._body = body

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for line in self._body:
            if line.strip():
                yield json.loads(line)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # already closed by the engine
            self._sock.shutdown(socket.SHUT_RDWR)  # the blocked read returns at once
        self._sock.close()


class EngineClient:
    """A client for the engine at a unix socket, with the SDK's method names."""

    def __init__(self, socket_path: str = DEFAULT_SOCKET, timeout: float = 10.0):
        self.socket_path = socket_path
        self.timeout = timeout

    @property
    def api(self) -> EngineClient:
        return self  # code written for docker.DockerClient calls client.api.<method>

    def ping(self) -> None:
        self._get("/_ping")

    def networks(self) -> list[dict[str, Any]]:
        return self._get_json("/networks")

    def containers(self, filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        return self._get_json("/containers/json", filters)

    def inspect_container(self, container_id: str) -> dict[str, Any]:
        return self._get_json(f"/containers/{urllib.parse.quote(container_id)}/json")

    def inspect_network(self, network_id: str) -> dict[str, Any]:
        return self._get_json(f"/networks/{urllib.parse.quote(network_id)}")

    def events(self, decode: bool = True, filters: dict[str, Any] | None = None) -> EventStream:
        """Always decoded (decode is the SDK's parameter, accepted for the same call)."""
        sock, body = self._open(_path_with_filters("/events", filters), timeout=None)
        return EventStream(sock, body)

    def _get_json(self, path: str, filters: dict[str, Any] | None = None) -> Any:
        return json.loads(self._get(_path_with_filters(path, filters)))

    def _get(self, path: str) -> bytes:
        sock, body = self._open(path, timeout=self.timeout)
        with sock, body:
            return body.read()

    def _open(self, path: str, timeout: float | None) -> tuple[socket.socket, Any]:
        """Send the request, read the status and headers; the body is what is left."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(self.socket_path)
            sock.sendall(f"GET {path} HTTP/1.0\r\nHost: docker\r\n\r\n".encode())
            body = sock.makefile("rb")
            status_line = body.readline(MAX_HEADER_BYTES)
            while body.readline(MAX_HEADER_BYTES) not in (b"\r\n", b"\n", b""):
                pass
            parts = status_line.split(None, 2)
            status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
            if status != 200:
                raise EngineError(status, _error_message(body.read()))
        except BaseException:
            sock.close()
            raise
        return sock, body


def _path_with_filters(path: str, filters: dict[str, Any] | None) -> str:
    if not filters:
        return path
    # as the SDK sends them: each filter a list of values
    lists = {key: value if isinstance(value, list) else [value] for key, value in filters.items()}
    return f"{path}?{urllib.parse.urlencode({'filters': json.dumps(lists)})}"


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body).get("message", ""))
    except (ValueError, AttributeError):
        return body.decode(errors="replace").strip()[:200]


def not_found(exc: Exception) -> bool:
    """A 404 from either client (ours or the SDK's NotFound)."""
    return getattr(exc, "status_code", None) == 404
