"""Fixtures for system tests: a real Docker engine, the local image, the upstream netns.

No skipping: a missing engine or image fails the run loudly (make test sets them up).
"""

from __future__ import annotations

import fcntl
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest
from lab import (
    PREFIX,
    RUN,
    TEST_IMAGE,
    Lab,
    Upstream,
    install_safety_routes,
    remove_safety_routes,
    remove_stale,
    sh,
)
from runner import running_agent

# A suite started as a background job of a shell (`make test &`, nohup) inherits SIGINT
# ignored, and an ignored signal stays ignored across exec: every egress-top it starts would
# shrug off the Ctrl-C the signal tests send. Its children get the default back.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

REPO = Path(__file__).resolve().parent.parent
MACHINE_LOCK = Path("/tmp/ett-machine.lock")  # shared with bench/: one user of tc and netns at a time


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    with open(MACHINE_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            client = docker.from_env(timeout=60)
            client.ping()
        except Exception as exc:
            pytest.fail(f"Docker engine not reachable ({exc}): run the suite with 'sudo make test'")
        remove_stale(client)
        yield client
        remove_stale(client)


@pytest.fixture(scope="session")
def test_image(docker_client: docker.DockerClient) -> str:
    subprocess.run([REPO / "scripts" / "build-test-image.sh"], check=True, capture_output=True)
    docker_client.images.get(TEST_IMAGE)
    return TEST_IMAGE


@pytest.fixture(scope="session")
def upstream(docker_client: docker.DockerClient) -> Iterator[Upstream]:
    safety = install_safety_routes()  # before any netns, veth or packet
    upstream = Upstream()
    try:
        upstream.create()
        yield upstream
    finally:
        upstream.destroy()
        remove_safety_routes(safety)


@pytest.fixture
def lab(docker_client: docker.DockerClient, test_image: str, upstream: Upstream) -> Iterator[Lab]:
    lab = Lab(docker_client)
    with upstream.sinks_of_a_test():
        try:
            yield lab
        finally:
            lab.destroy()


@pytest.fixture
def agent() -> Iterator[subprocess.Popen[str]]:
    """`egress-agent run -i 0.2` for the length of the test; it must exit 0 at the end."""
    yield from running_agent()


@pytest.fixture
def macvlan_parent() -> Iterator[str]:
    """A veth of our own, in no bridge, to hang a macvlan network on: these kernels have no
    dummy link type (`ip link add x type dummy`: unknown device type; `modprobe dummy`: not
    found). Named ettup*, so a crashed run's is removed at the next start."""
    name = f"{PREFIX}up{RUN}m"
    sh("ip", "link", "add", name, "type", "veth", "peer", "name", f"{PREFIX}up{RUN}p")
    sh("ip", "link", "set", name, "up")
    try:
        yield name
    finally:
        sh("ip", "link", "del", name, check=False)
