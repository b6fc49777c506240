"""Enforcement never fails open: a rule holds from the container's first packet.

The container's own command (tests/senders/udp_every_ms.c, static, bind-mounted) sends
one datagram every millisecond to a blocked and to an allowed address in the upstream
netns (for network connect: in a receiver container on the second network) from its first
instant. Across each lifecycle event, with `egress-agent run`
running, the blocked sink must receive nothing while the allowed one keeps receiving
(the proof that the new instance ran). EGRESS_TOP_TRIALS sets the trials per event; unset,
the heavy events (20 containers at once, a dockerd restart) get one trial, the others three.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
from docker.models.containers import Container
from lab import PREFIX, RUN, TEST_IMAGE, UPSTREAM_V4, UPSTREAM_V4_BLOCKME, Lab, Sink, sh, wait_until
from runner import only_enforcement_left_behind, run_cli

from agent.agent_status import read_live

TRIALS = int(os.environ.get("EGRESS_TOP_TRIALS", "3"))
HEAVY_TRIALS = int(os.environ.get("EGRESS_TOP_TRIALS", "1"))  # 20 containers at once, dockerd restarts
REPO = Path(__file__).resolve().parent.parent
SENDER_SOURCE = REPO / "tests" / "senders" / "udp_every_ms.c"
SENDER_IN_CONTAINER = "/udp_every_ms"
FREE_PORTS = itertools.count(6000)  # sinks live for the session: each test takes new ports
SEND_SECONDS = 90  # each sender stops by itself after this
# A bound on each test, over pytest's default 300 s: one heavy trial (20 starts at once, or a
# dockerd restart that brings its container back) took ~30 s here.
TEST_SECONDS = 300 + 90 * HEAVY_TRIALS
SINK_SECONDS = TEST_SECONDS  # a sink outlives the test that made it
pytestmark = pytest.mark.timeout(TEST_SECONDS)
SETTLED = 200  # allowed datagrams (~200 ms) after which a leak of the start would have arrived


@pytest.fixture(scope="module")
def sender(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("sender") / "udp_every_ms"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(SENDER_SOURCE)], check=True)
    return binary


@pytest.fixture(autouse=True)
def state_dir(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from only_enforcement_left_behind(tmp_path, monkeypatch)


def cli(*args: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, f"{args}: {result.stderr}"


def sender_command(destinations: Sequence[str], seconds: float = SEND_SECONDS) -> list[str]:
    """The container's command: one datagram per ms to each ADDR:PORT from its first instant."""
    return [SENDER_IN_CONTAINER, str(seconds), "1000", *destinations]


def sending_to(lab: Lab, sender: Path, network: str, destinations: Sequence[str], **kwargs) -> Container:  # type: ignore[no-untyped-def]
    command = sender_command(destinations, kwargs.pop("seconds", SEND_SECONDS))
    volumes = {str(sender): {"bind": SENDER_IN_CONTAINER, "mode": "ro"}}
    return lab.container(
        kwargs.pop("hint", "fc"), network=network, command=command, volumes=volumes, **kwargs
    )


def sending(lab: Lab, sender: Path, network: str, blocked: Sink, allowed: Sink, **kwargs) -> Container:  # type: ignore[no-untyped-def]
    """A container sending to the upstream netns: to the blocked and the allowed address."""
    destinations = (f"{UPSTREAM_V4_BLOCKME}:{blocked.port}", f"{UPSTREAM_V4}:{allowed.port}")
    return sending_to(lab, sender, network, destinations, **kwargs)


def keeps_receiving(sink: Sink, more: int = SETTLED, timeout: float = 15) -> None:
    """The sender of the new instance ran: its allowed datagrams arrive."""
    start = sink.counts()[0]
    sink.wait_for(start + more, timeout)


class Tally:
    """What each trial of one event let through: the datagrams the blocked sink got since the
    previous trial ended (so none falls between two trials), and the fewest any of the
    trial's allowed sinks got (the proof the senders ran)."""

    def __init__(self, event: str, blocked: Sink):
        self.event = event
        self.blocked = blocked
        self._blocked_seen = blocked.counts()[0]
        self.leaks: list[int] = []
        self.control: list[int] = []

    @contextmanager
    def trial(self, *allowed: Sink) -> Iterator[None]:
        allowed_before = [sink.counts()[0] for sink in allowed]
        yield
        blocked_now = self.blocked.counts()[0]
        self.leaks.append(blocked_now - self._blocked_seen)
        self._blocked_seen = blocked_now
        self.control.append(
            min(sink.counts()[0] - before for sink, before in zip(allowed, allowed_before, strict=True))
        )

    def check(self) -> None:
        """Printed in one line per event (pytest -s), then: no leak, and every sender ran."""
        leaking = sum(1 for leak in self.leaks if leak)
        print(
            f"\n{self.event}: {len(self.leaks)} trials, {leaking} with a blocked datagram passing, "
            f"{sum(self.leaks)} leaked, control min {min(self.control)} received; leaks {self.leaks}"
        )
        assert self.leaks == [0] * len(self.leaks)
        assert min(self.control) > 0


def blocked_under_rule(lab: Lab, upstream, sender: Path, **kwargs):  # type: ignore[no-untyped-def]
    """A sending container, its traffic to the blocked address shown to pass (the control),
    then the rule: returns (container, network, blocked sink, allowed sink)."""
    net = lab.network()
    blocked = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4_BLOCKME, lifetime=SINK_SECONDS)
    allowed = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4, lifetime=SINK_SECONDS)
    container = sending(lab, sender, net.name, blocked, allowed, **kwargs)
    blocked.wait_for(50, timeout=10)  # control: without the rule, the blocked address is reachable
    cli("egress-block", container.name, UPSTREAM_V4_BLOCKME)
    keeps_receiving(allowed)
    return container, net, blocked, allowed


def test_docker_restart_never_leaks(lab: Lab, upstream, agent, sender: Path) -> None:
    container, _net, blocked, allowed = blocked_under_rule(lab, upstream, sender)
    tally = Tally("docker restart", blocked)
    for _ in range(TRIALS):
        with tally.trial(allowed):
            container.restart(timeout=0)
            keeps_receiving(allowed)
    tally.check()


def test_rm_and_run_same_name_never_leaks(lab: Lab, upstream, agent, sender: Path) -> None:
    container, net, blocked, allowed = blocked_under_rule(lab, upstream, sender)
    tally = Tally("docker rm -f + docker run, same name", blocked)
    for _ in range(TRIALS):
        with tally.trial(allowed):
            name = container.name
            container.remove(force=True)
            container = sending(lab, sender, net.name, blocked, allowed, name=name)
            keeps_receiving(allowed)
    tally.check()


def test_twenty_pending_containers_started_at_once_never_leak(
    lab: Lab, upstream, agent, sender: Path
) -> None:
    net = lab.network()
    blocked = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4_BLOCKME, lifetime=SINK_SECONDS)
    control_allowed = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4, lifetime=SINK_SECONDS)
    control = sending(lab, sender, net.name, blocked, control_allowed, hint="control")
    blocked.wait_for(50, timeout=10)  # no rule for the control: the blocked address is reachable
    control.remove(force=True)
    tally = Tally("20 containers with --pending rules started at once", blocked)
    for trial in range(HEAVY_TRIALS):
        names = [f"{control.name}-p{trial}-{i}" for i in range(20)]
        for name in names:
            cli("egress-block", "--pending", name, UPSTREAM_V4_BLOCKME)
        allowed = [
            upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4, lifetime=SINK_SECONDS) for _ in range(20)
        ]
        with tally.trial(*allowed), ThreadPoolExecutor(20) as pool:
            starts = [
                pool.submit(sending, lab, sender, net.name, blocked, sink, name=name)
                for name, sink in zip(names, allowed, strict=True)
            ]
            for start in starts:
                start.result()
            for sink in allowed:
                keeps_receiving(sink)
        for name in names:
            lab.client.containers.get(name).remove(force=True)
        for sink in allowed:
            sink.stop()
    tally.check()


# The second network's own prefix: from the sender's netns, only the interface that network
# gives it reaches these (its connected route); before a connect they go to eth0 and the host,
# which does not forward them into that network's bridge (Docker's isolation; and a forwarded
# one would carry the gateway's address, which the allowed sink does not count).
SECOND_SUBNET = "198.18.12.0/24"
SENDER_ON_SECOND = "198.18.12.200"  # the sender's address on it, the same at every connect
BLOCKED_ON_SECOND = "198.18.12.250"  # a second address of the receiver: the rule's destination


@contextmanager
def named_netns(container: Container) -> Iterator[str]:
    """The container's netns under an `ip netns` name, for Sinks to run in."""
    name = f"{PREFIX}-rx-{RUN}"
    sh("ip", "netns", "attach", name, str(Lab.pid(container)))
    try:
        yield name
    finally:
        sh("ip", "netns", "del", name, check=False)


def test_network_connect_new_veth_is_enforced_from_its_first_datagram(
    lab: Lab, upstream, agent, sender: Path
) -> None:
    """The sender runs from before each connect, sending to a receiver on the second network:
    the new veth carries its datagrams from the first one after its address appears. The
    allowed sink counts only datagrams from the sender's address on that network, so each
    trial's count proves the new veth carried them."""
    second = lab.network(subnet=SECOND_SUBNET)
    receiver = lab.container("rx", network=second)
    with named_netns(receiver) as netns:
        sh("ip", "-n", netns, "addr", "add", f"{BLOCKED_ON_SECOND}/24", "dev", "eth0")
        blocked = Sink(netns, "udp", next(FREE_PORTS), BLOCKED_ON_SECOND, SINK_SECONDS)
        allowed_address = lab.ip(receiver, second.name)
        allowed = Sink(netns, "udp", next(FREE_PORTS), allowed_address, SINK_SECONDS, source=SENDER_ON_SECOND)
        try:
            destinations = (f"{BLOCKED_ON_SECOND}:{blocked.port}", f"{allowed_address}:{allowed.port}")
            container = sending_to(lab, sender, lab.network().name, destinations, seconds=SINK_SECONDS)
            # control: without the rule, the new veth carries datagrams to the blocked address
            second.connect(container, ipv4_address=SENDER_ON_SECOND)
            blocked.wait_for(50, timeout=10)
            second.disconnect(container)
            cli("egress-block", container.name, BLOCKED_ON_SECOND)
            tally = Tally("docker network connect (the new veth's own datagrams)", blocked)
            for _ in range(TRIALS):
                with tally.trial(allowed):
                    second.connect(container, ipv4_address=SENDER_ON_SECOND)
                    keeps_receiving(allowed)
                    second.disconnect(container)
            tally.check()
        finally:
            blocked.stop()
            allowed.stop()


COMPOSE_FILE = """
version: "2.4"
services:
  app:
    image: {image}
    command: {command}
    volumes: ["{sender}:{inside}:ro"]
"""


def test_compose_force_recreate_never_leaks(lab: Lab, upstream, agent, sender: Path, tmp_path: Path) -> None:
    blocked = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4_BLOCKME, lifetime=SINK_SECONDS)
    allowed = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4, lifetime=SINK_SECONDS)
    command = sender_command([f"{UPSTREAM_V4_BLOCKME}:{blocked.port}", f"{UPSTREAM_V4}:{allowed.port}"])
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(
        COMPOSE_FILE.format(
            image=TEST_IMAGE, command=json.dumps(command), sender=sender, inside=SENDER_IN_CONTAINER
        )
    )
    project = f"{PREFIX}-{RUN}-compose"
    compose = ["docker-compose", "-p", project, "-f", str(compose_file)]
    name = f"{project}_app_1"
    try:
        subprocess.run([*compose, "up", "-d"], check=True, capture_output=True, timeout=120)
        blocked.wait_for(50, timeout=10)  # control: without the rule, the blocked address is reachable
        cli("egress-block", name, UPSTREAM_V4_BLOCKME)
        keeps_receiving(allowed)
        tally = Tally("docker-compose up --force-recreate", blocked)
        for _ in range(TRIALS):
            with tally.trial(allowed):
                before = lab.client.containers.get(name).id
                subprocess.run(
                    [*compose, "up", "-d", "--force-recreate"], check=True, capture_output=True, timeout=120
                )
                assert lab.client.containers.get(name).id != before  # a new container, the same name
                keeps_receiving(allowed)
    finally:
        subprocess.run([*compose, "down", "-t", "0"], capture_output=True, timeout=120)
    tally.check()


def _dockerd_pid() -> int | None:
    found = subprocess.run(["pidof", "dockerd"], capture_output=True, text=True).stdout.split()
    return int(found[0]) if found else None


def _restart_dockerd() -> None:
    """Stop the engine and start it again the way scripts/bootstrap.sh does."""
    pid = _dockerd_pid()
    if pid is not None:
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: _dockerd_pid() is None, timeout=60)
    _ensure_dockerd()


def _ensure_dockerd() -> None:
    subprocess.run([str(REPO / "scripts" / "bootstrap.sh")], check=True, capture_output=True, timeout=180)


def test_dockerd_restart_with_restart_always_never_leaks(lab: Lab, upstream, agent, sender: Path) -> None:
    net = lab.network()
    blocked = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4_BLOCKME, lifetime=SINK_SECONDS)
    allowed = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4, lifetime=SINK_SECONDS)
    container = sending(lab, sender, net.name, blocked, allowed, restart_policy={"Name": "always"})
    blocked.wait_for(50, timeout=10)
    cli("egress-block", container.name, UPSTREAM_V4_BLOCKME)
    keeps_receiving(allowed)
    tally = Tally("dockerd restart, --restart always", blocked)
    try:
        for _ in range(HEAVY_TRIALS):
            with tally.trial(allowed):
                _restart_dockerd()
                keeps_receiving(allowed, timeout=60)  # dockerd brought the container back, and it sends
    finally:
        _ensure_dockerd()
    tally.check()
    # the engine went away under the agent: its calls failed, were retried, and are counted
    status = read_live()
    assert status is not None and status.refresh_retries > 0
