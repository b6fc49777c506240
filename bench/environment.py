"""The bench's own little world: an `upstream` netns, a Docker bridge network, containers.

Network safety: unreachable routes for every test prefix go in before anything
is created, so a half-built setup can leak nothing. Packets go only to the upstream
netns (198.18.0.0/24 behind the veth `ettb-up0`; the test suite's lab uses
198.51.100.0/24, so the smoke test can run inside the suite) and to our containers.
Everything is named `ettb…`, registered for removal the moment it exists, and removed
at exit even on failure (finally, atexit, SIGTERM/SIGHUP); leftovers of a killed run are
removed at the next start.
"""

from __future__ import annotations

import atexit
import contextlib
import io
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from agent.datapath import cleanup_everything, our_filters, pins_exist
from agent.datapath.lifecycle import exclusive, live_holders
from agent.inventory import DockerInventory
from bench.common import progress

PREFIX = "ettb"
# Never 192.0.2.0/24 or 203.0.113.0/24: on these machines they carry the host's own traffic.
SAFETY_PREFIXES = ("198.51.100.0/24", "198.18.0.0/15", "2001:db8::/32")
SAFETY_METRIC = "4242"
UPSTREAM_NETNS = "ettb-up"
UPSTREAM_VETH = "ettb-up0"
UPSTREAM_HOST_SIDE = "198.18.0.254"
UPSTREAM_SERVER = "198.18.0.1"  # iperf3 server
UPSTREAM_BLOCKED = "198.18.0.7"  # destination of the block/unblock latency sender
UPSTREAM_PING = "198.18.0.9"  # destination of the attach latency pings
NETWORK_NAME = "ettb-net"
NETWORK_BRIDGE = "ettb-br0"
NETWORK_SUBNET = "10.219.0.0/22"  # room for 200+ containers
PROJECT_IMAGE = "egress-top-test/busybox:1"  # scripts/build-test-image.sh
OWN_IMAGE = "ettb/busybox:1"
HOST_PYTHON = "/usr/bin/python3"  # runs inside netns we enter, never inside an image
SYSCTLS = {"net.ipv4.ip_forward": "1"}
IPTABLES_HOOK_CHAIN = "DOCKER-USER"  # Docker jumps to it first from FORWARD
NFT_TABLE = "ettb"  # family inet


def sh(*args: str, check: bool = True, timeout: float = 120, stdin: str | None = None) -> str:
    result = subprocess.run(args, capture_output=True, text=True, timeout=timeout, input=stdin)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:6])}: {result.stderr.strip() or result.returncode}")
    return result.stdout


def netns_exec(pid: int) -> list[str]:
    """Command prefix running a host binary inside a container's network namespace."""
    return ["nsenter", f"--net=/proc/{pid}/ns/net"]


@dataclass
class Teardown:
    """Undo actions, last in first out, run once: by the finally, or by atexit."""

    actions: list[tuple[str, Callable[[], Any]]] = field(default_factory=list)

    def add(self, what: str, action: Callable[[], Any]) -> None:
        self.actions.append((what, action))

    def run(self) -> None:
        while self.actions:
            what, action = self.actions.pop()
            try:
                action()
            except Exception as exc:  # keep undoing the rest
                progress(f"cleanup: {what} failed: {exc}")


class Environment:
    """Safety routes, upstream netns, Docker network, image; containers on demand."""

    def __init__(self, client: docker.DockerClient):
        self.client = client
        self.teardown = Teardown()
        self.image = PROJECT_IMAGE
        self.network: Any = None
        self._containers: list[Container] = []

    # --- setup ---------------------------------------------------------------------------

    def create(self) -> None:
        self.teardown.add("our tc filters and pins", cleanup_everything)
        self._install_safety_routes()  # before any netns, veth or packet
        remove_leftovers(self.client)
        self.teardown.add("iptables chains and nft table", remove_firewall_rules)
        self._set_sysctls()
        self._create_upstream()
        self._ensure_image()
        self._create_network()

    def _install_safety_routes(self) -> None:
        for prefix in SAFETY_PREFIXES:
            family = "-6" if ":" in prefix else "-4"
            route = ("unreachable", prefix, "metric", SAFETY_METRIC)
            if subprocess.run(["ip", family, "route", "add", *route], capture_output=True).returncode == 0:
                self.teardown.add(
                    f"route {prefix}", lambda f=family, r=route: sh("ip", f, "route", "del", *r)
                )
            elif SAFETY_METRIC not in sh("ip", family, "route", "show", prefix):
                # someone else's (the test session's) is fine; none at all is not
                raise RuntimeError(f"cannot install the unreachable route for {prefix}")

    def _set_sysctls(self) -> None:
        for key, value in SYSCTLS.items():
            before = sh("sysctl", "-n", key).strip()
            if before != value:
                self.teardown.add(f"sysctl {key}", lambda k=key, v=before: sh("sysctl", "-qw", f"{k}={v}"))
                sh("sysctl", "-qw", f"{key}={value}")

    def _create_upstream(self) -> None:
        self.teardown.add("netns", lambda: sh("ip", "netns", "del", UPSTREAM_NETNS, check=False))
        self.teardown.add("veth", lambda: sh("ip", "link", "del", UPSTREAM_VETH, check=False))
        sh("ip", "netns", "add", UPSTREAM_NETNS)
        sh(
            "ip",
            "link",
            "add",
            UPSTREAM_VETH,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            UPSTREAM_NETNS,
        )
        sh("ip", "addr", "add", f"{UPSTREAM_HOST_SIDE}/24", "dev", UPSTREAM_VETH)
        sh("ip", "link", "set", UPSTREAM_VETH, "up")
        for address in (UPSTREAM_SERVER, UPSTREAM_BLOCKED, UPSTREAM_PING):
            sh("ip", "-n", UPSTREAM_NETNS, "addr", "add", f"{address}/24", "dev", "eth0")
        sh("ip", "-n", UPSTREAM_NETNS, "link", "set", "eth0", "up")
        sh("ip", "-n", UPSTREAM_NETNS, "link", "set", "lo", "up")
        sh("ip", "-n", UPSTREAM_NETNS, "route", "add", "default", "via", UPSTREAM_HOST_SIDE)

    def _ensure_image(self) -> None:
        """The project's test image; else our own, imported from Debian's busybox (no registry)."""
        with contextlib.suppress(docker.errors.ImageNotFound):
            self.client.images.get(PROJECT_IMAGE)
            return
        progress(f"{PROJECT_IMAGE} missing: importing {OWN_IMAGE} from /bin/busybox")
        self.teardown.add("image", lambda: self.client.images.remove(OWN_IMAGE, force=True))
        if not _image_exists(self.client, OWN_IMAGE):
            _import_busybox()
        self.image = OWN_IMAGE

    def _create_network(self) -> None:
        self.teardown.add("network", lambda: _remove_network(self.client))
        self.network = self.client.networks.create(
            NETWORK_NAME,
            driver="bridge",
            options={"com.docker.network.bridge.name": NETWORK_BRIDGE},
            ipam=docker.types.IPAMConfig(pool_configs=[docker.types.IPAMPool(subnet=NETWORK_SUBNET)]),
        )

    # --- containers ----------------------------------------------------------------------

    def container(self, name: str, command: list[str] | None = None, start: bool = True) -> Container:
        """A container on our network (sleeps unless told otherwise), removed at the end."""
        if not self._containers:
            self.teardown.add("containers", self.remove_containers)
        container = self.client.containers.create(
            self.image, command or ["sleep", "3600"], name=f"{PREFIX}-{name}", network=NETWORK_NAME
        )
        self._containers.append(container)
        if start:
            container.start()
        return container

    def containers(self, prefix: str, count: int) -> list[Container]:
        """`count` sleeping containers, started a few at a time (dockerd does the work)."""
        with ThreadPoolExecutor(4) as pool:
            return list(pool.map(lambda n: self.container(f"{prefix}{n:03d}"), range(count)))

    def remove(self, container: Container) -> None:
        with contextlib.suppress(docker.errors.NotFound):
            container.remove(force=True)

    def remove_containers(self) -> None:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(self.remove, self._containers))
        self._containers.clear()

    @staticmethod
    def pid(container: Container) -> int:
        container.reload()
        return int(container.attrs["State"]["Pid"])

    def veth_ifindexes(self, containers: list[Container]) -> dict[str, int]:
        """Container name -> its host-side veth, as the project's inventory sees it."""
        inventory = DockerInventory(self.client).snapshot()
        found = {}
        for container in containers:
            seen = inventory.find(container.name)
            if seen is None or len(seen.endpoints) != 1:
                raise RuntimeError(f"{container.name}: expected one veth, found {seen}")
            found[container.name] = seen.endpoints[0].ifindex
        return found


def _image_exists(client: docker.DockerClient, name: str) -> bool:
    try:
        client.images.get(name)
    except docker.errors.ImageNotFound:
        return False
    return True


def _import_busybox() -> None:
    """A rootfs with Debian's /bin/busybox and its applets, through `docker import`."""
    applets = sh("/bin/busybox", "--list").split()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        tar.add("/bin/busybox", "bin/busybox")
        for applet in applets:
            if applet != "busybox":
                link = tarfile.TarInfo(f"bin/{applet}")
                link.type, link.linkname = tarfile.SYMTYPE, "busybox"
                tar.addfile(link)
        tmp = tarfile.TarInfo("tmp")
        tmp.type, tmp.mode = tarfile.DIRTYPE, 0o1777
        tar.addfile(tmp)
    with tempfile.NamedTemporaryFile(suffix=".tar") as rootfs:
        rootfs.write(archive.getvalue())
        rootfs.flush()
        sh("docker", "import", "--change", "ENV PATH=/bin", rootfs.name, OWN_IMAGE)


def _remove_network(client: docker.DockerClient) -> None:
    for network in client.networks.list(names=[NETWORK_NAME]):
        if network.name == NETWORK_NAME:
            network.remove()


def remove_firewall_rules() -> None:
    """Every iptables chain named ettb… with the jumps to it, and the nft table ettb."""
    for line in sh("iptables", "-S", IPTABLES_HOOK_CHAIN, check=False).splitlines():
        if f"-j {PREFIX}" in line:
            sh("iptables", *line.replace("-A", "-D", 1).split())
    chains = [
        line.split()[1] for line in sh("iptables", "-S").splitlines() if line.startswith(f"-N {PREFIX}")
    ]
    for chain in chains:
        sh("iptables", "-F", chain)
        sh("iptables", "-X", chain)
    if NFT_TABLE in sh("nft", "list", "tables", "inet").split():
        sh("nft", "delete", "table", "inet", NFT_TABLE)


def remove_leftovers(client: docker.DockerClient) -> None:
    """What a killed earlier run left: everything named ettb… (only the bench uses it)."""
    for container in client.containers.list(all=True, filters={"name": f"{PREFIX}-"}):
        if container.name.startswith(f"{PREFIX}-"):
            container.remove(force=True)
    _remove_network(client)
    sh("ip", "netns", "del", UPSTREAM_NETNS, check=False)
    sh("ip", "link", "del", UPSTREAM_VETH, check=False)
    remove_firewall_rules()


def refuse_if_busy() -> None:
    """Another egress-top or agent would fight us over the veths and the maps."""
    with exclusive():
        live = live_holders()
    if live:
        pids = ", ".join(name.partition("-")[0] for name in live)
        raise SystemExit(f"bench: egress-top/egress-agent running (pids {pids}): stop it first")
    if our_filters() or pins_exist():
        progress("removing filters and pins of ours left by an earlier run")
        cleanup_everything()


@contextlib.contextmanager
def environment() -> Iterator[Environment]:
    refuse_if_busy()
    client = docker.from_env(timeout=180)
    env = Environment(client)
    atexit.register(env.teardown.run)  # a SystemExit from a signal handler still unwinds first
    started = time.monotonic()
    try:
        env.create()
        progress(f"environment ready in {time.monotonic() - started:.1f} s")
        yield env
    finally:
        env.teardown.run()
