"""The test lab: an `upstream` netns standing in for the internet, Docker networks and
containers of our own, and ways to make traffic from inside a container's netns.

Network safety: before anything is created, the test prefixes get unreachable routes
(metric 4242), so if setup fails half-way no packet can leave the machine. Traffic
goes only to the lab's own containers and its own netns. Everything is named
`ett*` with a per-run suffix, removed at teardown, and stale `ett*` leftovers of a
crashed run are removed at the next session start.
"""

from __future__ import annotations

import contextlib
import ipaddress
import random
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import docker
import docker.errors
from docker.models.containers import Container
from docker.models.networks import Network

TEST_IMAGE = "egress-top-test/busybox:1"
UPSTREAM_V4 = "198.51.100.1"
UPSTREAM_V4_OTHER = "198.51.100.2"
UPSTREAM_V4_BLOCKME = "198.51.100.7"
UPSTREAM_V6 = "2001:db8:100::1"
UPSTREAM_V6_OTHER = "2001:db8:100::2"
HOST_UPSTREAM_V4 = "198.51.100.254"
HOST_UPSTREAM_V6 = "2001:db8:100::fe"
# Never 192.0.2.0/24 or 203.0.113.0/24: on these machines they carry the host's own traffic.
SAFETY_PREFIXES = ("198.51.100.0/24", "198.18.0.0/15", "2001:db8::/32")
SAFETY_METRIC = "4242"
PREFIX = "ett"
RUN = f"{random.randrange(16**4):04x}"
PYTHON = "/usr/bin/python3"  # the host's: it runs inside netns we enter, never inside an image

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.05,
    describe: Callable[[], object] | None = None,
) -> T:
    """Poll until predicate() is truthy; return its value, or fail the test (with what
    describe() tells of the state it ended in)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            state = f": {describe()}" if describe else ""
            raise AssertionError(f"condition not met within {timeout}s{state}")
        time.sleep(interval)


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=60)


def install_safety_routes() -> list[str]:
    """Unreachable routes for every test prefix; returns the ones we added."""
    added = []
    for prefix in SAFETY_PREFIXES:
        family = "-6" if ":" in prefix else "-4"
        if (
            sh(
                "ip", family, "route", "add", "unreachable", prefix, "metric", SAFETY_METRIC, check=False
            ).returncode
            == 0
        ):
            added.append(prefix)
    return added


def remove_safety_routes(prefixes: list[str]) -> None:
    for prefix in prefixes:
        family = "-6" if ":" in prefix else "-4"
        sh("ip", family, "route", "del", "unreachable", prefix, "metric", SAFETY_METRIC, check=False)


def remove_stale(client: docker.DockerClient) -> None:
    """Leftovers of an earlier run that crashed before its teardown."""
    for container in client.containers.list(all=True, filters={"name": f"{PREFIX}-"}):
        with contextlib.suppress(docker.errors.APIError):
            container.remove(force=True)
    for network in client.networks.list(names=[f"{PREFIX}-"]):
        if network.name.startswith(f"{PREFIX}-"):
            with contextlib.suppress(docker.errors.APIError):
                network.remove()
    for line in sh("ip", "netns", "list").stdout.splitlines():
        name = line.split()[0] if line.strip() else ""
        if name.startswith(f"{PREFIX}-"):
            sh("ip", "netns", "del", name, check=False)
    for line in sh("ip", "-o", "link", "show").stdout.splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}up"):
            sh("ip", "link", "del", name, check=False)


# --- traffic from inside a network namespace ----------------------------------------

_SINK = r"""
import os, selectors, socket, sys, time
proto, address, port, lifetime, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
source = sys.argv[6]  # UDP: count only datagrams from this address ("" counts all)
family = socket.AF_INET6 if ":" in address else socket.AF_INET
count = total = 0
def report():
    with open(out + ".tmp", "w") as f:
        f.write(f"{count} {total}")
    os.replace(out + ".tmp", out)
sel = selectors.DefaultSelector()
if proto == "udp":
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.bind((address, port))
else:
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((address, port))
    s.listen(64)
sel.register(s, selectors.EVENT_READ)
report()
end = time.monotonic() + lifetime
while time.monotonic() < end:
    for key, _ in sel.select(timeout=0.2):
        sock = key.fileobj
        if proto == "udp":
            data, peer = sock.recvfrom(65535)
            if source and peer[0] != source:
                continue
            count += 1
            total += len(data)
        elif sock is s:
            conn, _ = s.accept()
            count += 1
            sel.register(conn, selectors.EVENT_READ)
        else:
            try:
                data = sock.recv(65535)
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
            total += len(data)
        report()
"""

_WAIT_FOR_IPV6 = r"""
import time
def wait_ipv6_ready(limit=5.0):
    # A tentative (DAD) address cannot be a source yet: wait until none is left.
    end = time.monotonic() + limit
    while time.monotonic() < end:
        lines = open("/proc/net/if_inet6").read().split()
        flags = [int(lines[i], 16) for i in range(4, len(lines), 6)]
        if not any(f & 0x40 for f in flags):
            return
        time.sleep(0.05)
"""

_SEND_UDP = (
    _WAIT_FOR_IPV6
    + r"""
import socket, sys
dst, port, count, size, src_port, interval = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
family = socket.AF_INET6 if ":" in dst else socket.AF_INET
if family == socket.AF_INET6:
    wait_ipv6_ready()
s = socket.socket(family, socket.SOCK_DGRAM)
s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", src_port))
payload = b"x" * size
for _ in range(count):
    s.sendto(payload, (dst, port))
    if interval:
        time.sleep(interval)
print(s.getsockname()[1])
"""
)

_TCP_CONNECT = (
    _WAIT_FOR_IPV6
    + r"""
import socket, sys
dst, port, payload, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
if ":" in dst:
    wait_ipv6_ready()
try:
    with socket.create_connection((dst, port), timeout=timeout) as s:
        s.sendall(b"y" * payload)
    print("connected")
except OSError as e:
    print("failed", e)
"""
)


def run_in_netns(netns: str, script: str, *args: Any, timeout: float = 30) -> str:
    """Run a Python snippet (host interpreter) in a netns given as a path or an `ip netns` name."""
    path = netns if netns.startswith("/") else f"/run/netns/{netns}"
    result = subprocess.run(
        ["nsenter", f"--net={path}", PYTHON, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"in {netns}: {result.stderr.strip()}")
    return result.stdout.strip()


class Sink:
    """A UDP or TCP server in a netns of ours (`ip netns` name) that counts what it receives
    (a UDP sink given `source` counts only what that address sent)."""

    def __init__(self, netns: str, proto: str, port: int, address: str, lifetime: float, source: str = ""):
        self.port = port
        self._dir = tempfile.TemporaryDirectory(prefix="ett-sink-")
        self.path = Path(self._dir.name) / "counts"
        self.proc = subprocess.Popen(
            [
                "ip",
                "netns",
                "exec",
                netns,
                PYTHON,
                "-c",
                _SINK,
                proto,
                address,
                str(port),
                str(lifetime),
                str(self.path),
                source,
            ],
            stderr=subprocess.PIPE,
            text=True,
        )
        wait_until(lambda: self.path.exists() or self.proc.poll() is not None, timeout=5)
        if self.proc.poll() is not None:
            raise AssertionError(f"sink on {address}:{port} failed: {self.proc.stderr.read()}")  # type: ignore[union-attr]

    def counts(self) -> tuple[int, int]:
        """(datagrams, payload bytes) for UDP; (connections, payload bytes) for TCP."""
        count, total = self.path.read_text().split()
        return int(count), int(total)

    def wait_for(self, count: int, timeout: float) -> tuple[int, int]:
        wait_until(lambda: self.counts()[0] >= count, timeout)
        return self.counts()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self._dir.cleanup()


class Upstream:
    """The netns standing in for the internet: 198.51.100.0/24 and 2001:db8:100::/64 behind a veth."""

    def __init__(self) -> None:
        self.netns = f"{PREFIX}-up-{RUN}"
        self.host_veth = f"{PREFIX}up{RUN}"
        self._sinks: list[Sink] = []
        self._sysctls: dict[str, str] = {}

    def create(self) -> None:
        ns, veth = self.netns, self.host_veth
        sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", ns)
        sh("ip", "addr", "add", f"{HOST_UPSTREAM_V4}/24", "dev", veth)
        sh("ip", "-6", "addr", "add", f"{HOST_UPSTREAM_V6}/64", "dev", veth, "nodad")
        sh("ip", "link", "set", veth, "up")
        for v4 in (UPSTREAM_V4, UPSTREAM_V4_OTHER, UPSTREAM_V4_BLOCKME):
            sh("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", "eth0")
        for v6 in (UPSTREAM_V6, UPSTREAM_V6_OTHER):
            sh("ip", "-n", ns, "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad")
        sh("ip", "-n", ns, "link", "set", "eth0", "up")
        sh("ip", "-n", ns, "link", "set", "lo", "up")
        sh("ip", "-n", ns, "route", "add", "default", "via", HOST_UPSTREAM_V4)
        sh("ip", "-n", ns, "-6", "route", "add", "default", "via", HOST_UPSTREAM_V6)
        for key in ("net.ipv4.ip_forward", "net.ipv6.conf.all.forwarding"):
            self._sysctls[key] = sh("sysctl", "-n", key).stdout.strip()
            sh("sysctl", "-qw", f"{key}=1")

    @contextlib.contextmanager
    def sinks_of_a_test(self) -> Iterator[None]:
        """Stops the sinks made inside the with-block (one test's own): a sink left listening
        would hold its port for the next test in this session-long netns."""
        mark = len(self._sinks)
        try:
            yield
        finally:
            self._stop_sinks(mark)

    def _stop_sinks(self, mark: int) -> None:
        for sink in self._sinks[mark:]:
            sink.stop()
        del self._sinks[mark:]

    def destroy(self) -> None:
        self._stop_sinks(0)
        sh("ip", "netns", "del", self.netns, check=False)
        sh("ip", "link", "del", self.host_veth, check=False)
        for key, value in self._sysctls.items():
            sh("sysctl", "-qw", f"{key}={value}", check=False)

    def udp_sink(self, port: int, address: str = "0.0.0.0", lifetime: float = 120) -> Sink:
        sink = Sink(self.netns, "udp", port, address, lifetime)
        self._sinks.append(sink)
        return sink

    def tcp_sink(self, port: int, address: str = "0.0.0.0", lifetime: float = 120) -> Sink:
        sink = Sink(self.netns, "tcp", port, address, lifetime)
        self._sinks.append(sink)
        return sink

    def exec(self, cmd: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.netns, *cmd], capture_output=True, text=True, timeout=timeout
        )


class Lab:
    """Docker networks and containers of one test, all removed at teardown."""

    def __init__(self, client: docker.DockerClient):
        self.client = client
        self._containers: list[Container] = []
        self._networks: list[Network] = []
        self._names: set[str] = set()

    def network(self, ipv6: bool = False, subnet: str | None = None, subnet6: str | None = None) -> Network:
        name = f"{PREFIX}-{RUN}-net{len(self._networks) + 1}"
        for _attempt in range(20):
            third = random.randrange(1, 255)
            pools = [docker.types.IPAMPool(subnet=subnet or f"10.213.{third}.0/24")]
            if ipv6:
                pools.append(docker.types.IPAMPool(subnet=subnet6 or f"fd00:e7:{third:x}::/64"))
            try:
                network = self.client.networks.create(
                    name, driver="bridge", enable_ipv6=ipv6, ipam=docker.types.IPAMConfig(pool_configs=pools)
                )
                break
            except docker.errors.APIError as exc:
                if subnet or "overlap" not in str(exc):
                    raise
        else:
            raise AssertionError("no free 10.213.x.0/24 subnet for a test network")
        self._networks.append(network)
        return network

    def container(
        self,
        name_hint: str,
        network: str | Network | None = None,
        command: str | list[str] | None = None,
        network_mode: str | None = None,
        extra_networks: list[str | Network] | tuple[()] = (),
        start: bool = True,
        name: str | None = None,
        **kwargs: Any,
    ) -> Container:
        name = name or self._fresh_name(name_hint)
        self._names.add(name)
        network_name = network.name if isinstance(network, Network) else network
        container = self.client.containers.create(
            TEST_IMAGE,
            command or ["sleep", "600"],
            name=name,
            network=network_name if not network_mode else None,
            network_mode=network_mode,
            **kwargs,
        )
        self._containers.append(container)
        for extra in extra_networks:
            (extra if isinstance(extra, Network) else self.client.networks.get(extra)).connect(container)
        if start:
            container.start()
        container.reload()
        return container

    def _fresh_name(self, hint: str) -> str:
        name, number = f"{PREFIX}-{RUN}-{hint}", 1
        while name in self._names:
            number += 1
            name = f"{PREFIX}-{RUN}-{hint}{number}"
        return name

    def destroy(self) -> None:
        for container in self._containers:
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True)
        # a container re-created under a name we gave is ours too
        for name in self._names:
            with contextlib.suppress(docker.errors.NotFound):
                self.client.containers.get(name).remove(force=True)
        for network in self._networks:
            with contextlib.suppress(docker.errors.NotFound):
                network.remove()

    @staticmethod
    def pid(container: Container) -> int:
        container.reload()
        return int(container.attrs["State"]["Pid"])

    @staticmethod
    def _settings(container: Container, network: str | None) -> dict[str, Any]:
        container.reload()
        networks = container.attrs["NetworkSettings"]["Networks"]
        return networks[network] if network else next(iter(networks.values()))

    def ip(self, container: Container, network: str | None = None) -> str:
        return self._settings(container, network)["IPAddress"]

    def ip6(self, container: Container, network: str | None = None) -> str:
        return self._settings(container, network)["GlobalIPv6Address"]

    def send_udp(
        self,
        container: Container,
        dst: str,
        port: int,
        count: int,
        size: int,
        src_port: int = 0,
        interval: float = 0.0,
    ) -> int:
        """Exactly `count` datagrams of `size` bytes from one socket in the container's
        netns; returns the source port used."""
        ipaddress.ip_address(dst)  # never a name: nothing here may resolve
        out = run_in_netns(
            f"/proc/{self.pid(container)}/ns/net", _SEND_UDP, dst, port, count, size, src_port, interval
        )
        return int(out)

    def tcp_connect(
        self, container: Container, dst: str, port: int, payload: int = 0, timeout: float = 3.0
    ) -> bool:
        ipaddress.ip_address(dst)
        out = run_in_netns(
            f"/proc/{self.pid(container)}/ns/net",
            _TCP_CONNECT,
            dst,
            port,
            payload,
            timeout,
            timeout=timeout + 10,
        )
        return out == "connected"


def network_of_driver(lab: Lab, driver: str, parent: str, subnet: str) -> Network:
    """A macvlan/ipvlan network on `parent` (a link of the test's), removed with the lab."""
    network = lab.client.networks.create(
        f"{PREFIX}-{RUN}-{driver}",
        driver=driver,
        options={"parent": parent},
        ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=subnet)]),
    )
    lab._networks.append(network)
    return network
