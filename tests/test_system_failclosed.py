"""Enforcement never fails open: a rule holds from the container's first packet.

The container's own command (tests/senders/udp_every_ms.c, static, bind-mounted) sends
one datagram every millisecond to a blocked and to an allowed address in the upstream
netns from its first instant. Across each lifecycle event, with `egress-agent run`
running, the blocked sink must receive nothing while the allowed one keeps receiving
(the proof that the new instance ran). EGRESS_TOP_TRIALS sets the trials per event.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from lab import PREFIX, RUN, TEST_IMAGE, UPSTREAM_V4, UPSTREAM_V4_BLOCKME, Lab, Sink, wait_until
from runner import only_enforcement_left_behind, run_cli, running_agent

from agent.agent_status import read_live
from agent.datapath import our_filters

TRIALS = int(os.environ.get("EGRESS_TOP_TRIALS", "3"))
REPO = Path(__file__).resolve().parent.parent
SENDER_SOURCE = REPO / "tests" / "senders" / "udp_every_ms.c"
SENDER_IN_CONTAINER = "/udp_every_ms"
FREE_PORTS = itertools.count(6000)  # sinks live for the session: each test takes new ports
SEND_SECONDS = 90  # each sender stops by itself after this
SINK_SECONDS = 900  # a sink outlives the longest test (20 trials of compose: ~150 s)
SETTLED = 200  # allowed datagrams (~200 ms) after which a leak of the start would have arrived


@pytest.fixture(scope="module")
def sender(tmp_path_factory: pytest.TempPathFactory) -> Path:
    binary = tmp_path_factory.mktemp("sender") / "udp_every_ms"
    subprocess.run(["gcc", "-O2", "-static", "-o", str(binary), str(SENDER_SOURCE)], check=True)
    return binary


@pytest.fixture(autouse=True)
def state_dir(lab: Lab, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from only_enforcement_left_behind(tmp_path, monkeypatch)


@pytest.fixture
def agent() -> Iterator[subprocess.Popen[str]]:
    yield from running_agent()


def cli(*args: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 0, f"{args}: {result.stderr}"


def sending(lab: Lab, sender: Path, network: str, blocked: Sink, allowed: Sink, **kwargs):  # type: ignore[no-untyped-def]
    command = [
        SENDER_IN_CONTAINER,
        str(SEND_SECONDS),
        "1000",
        f"{UPSTREAM_V4_BLOCKME}:{blocked.port}",
        f"{UPSTREAM_V4}:{allowed.port}",
    ]
    volumes = {str(sender): {"bind": SENDER_IN_CONTAINER, "mode": "ro"}}
    return lab.container(
        kwargs.pop("hint", "fc"), network=network, command=command, volumes=volumes, **kwargs
    )


def keeps_receiving(sink: Sink, more: int = SETTLED, timeout: float = 15) -> None:
    """The sender of the new instance ran: its allowed datagrams arrive."""
    start = sink.counts()[0]
    sink.wait_for(start + more, timeout)


def blocked_under_rule(lab: Lab, upstream, sender: Path, **kwargs):  # type: ignore[no-untyped-def]
    """A sending container, its traffic to the blocked address shown to pass (the control),
    then the rule: returns (container, network, blocked sink, allowed sink, baseline)."""
    net = lab.network()
    blocked = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4_BLOCKME, lifetime=SINK_SECONDS)
    allowed = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4, lifetime=SINK_SECONDS)
    container = sending(lab, sender, net.name, blocked, allowed, **kwargs)
    blocked.wait_for(50, timeout=10)  # control: without the rule, the blocked address is reachable
    cli("egress-block", container.name, UPSTREAM_V4_BLOCKME)
    keeps_receiving(allowed)
    return container, net, blocked, allowed, blocked.counts()[0]


def test_docker_restart_never_leaks(lab: Lab, upstream, agent, sender: Path) -> None:
    container, _net, blocked, allowed, baseline = blocked_under_rule(lab, upstream, sender)
    leaks = []
    for _ in range(TRIALS):
        container.restart(timeout=0)
        keeps_receiving(allowed)
        leaks.append(blocked.counts()[0] - baseline - sum(leaks))
    print(f"\nleaks per restart trial: {leaks}")
    assert leaks == [0] * TRIALS


def test_rm_and_run_same_name_never_leaks(lab: Lab, upstream, agent, sender: Path) -> None:
    container, net, blocked, allowed, baseline = blocked_under_rule(lab, upstream, sender)
    leaks = []
    for _ in range(TRIALS):
        name = container.name
        container.remove(force=True)
        container = sending(lab, sender, net.name, blocked, allowed, name=name)
        keeps_receiving(allowed)
        leaks.append(blocked.counts()[0] - baseline - sum(leaks))
    print(f"\nleaks per rm+run trial: {leaks}")
    assert leaks == [0] * TRIALS


def test_twenty_pending_containers_started_at_once_never_leak(
    lab: Lab, upstream, agent, sender: Path
) -> None:
    net = lab.network()
    blocked = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4_BLOCKME, lifetime=SINK_SECONDS)
    control_allowed = upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4, lifetime=SINK_SECONDS)
    control = sending(lab, sender, net.name, blocked, control_allowed, hint="control")
    blocked.wait_for(50, timeout=10)  # no rule for the control: the blocked address is reachable
    control.remove(force=True)
    leaks = []
    for trial in range(max(1, TRIALS // 3)):
        names = [f"{control.name}-p{trial}-{i}" for i in range(20)]
        for name in names:
            cli("egress-block", "--pending", name, UPSTREAM_V4_BLOCKME)
        allowed = [
            upstream.udp_sink(next(FREE_PORTS), address=UPSTREAM_V4, lifetime=SINK_SECONDS) for _ in range(20)
        ]
        baseline = blocked.counts()[0]
        with ThreadPoolExecutor(20) as pool:
            starts = [
                pool.submit(sending, lab, sender, net.name, blocked, sink, name=name)
                for name, sink in zip(names, allowed, strict=True)
            ]
            for start in starts:
                start.result()
        for sink in allowed:
            keeps_receiving(sink)
        leaks.append(blocked.counts()[0] - baseline)
        for name in names:
            lab.client.containers.get(name).remove(force=True)
        for sink in allowed:
            sink.stop()
    print(f"\nleaks per 20-at-once trial: {leaks}")
    assert leaks == [0] * len(leaks)


def test_network_connect_to_a_second_network_is_enforced_at_once(
    lab: Lab, upstream, agent, sender: Path
) -> None:
    container, _net, blocked, allowed, baseline = blocked_under_rule(lab, upstream, sender)
    for _ in range(TRIALS):
        second = lab.network()
        second.connect(container)
        container.reload()
        ifindexes = wait_until(lambda: _veths_of(container) if len(_veths_of(container)) >= 2 else None, 10)
        # every veth of the container, the new one too, is tagged before the agent says so
        wait_until(lambda: read_live() and container.name in read_live().containers_enforced, 10)
        assert set(ifindexes) <= set(our_filters())
        keeps_receiving(allowed)
        second.disconnect(container)
    assert blocked.counts()[0] == baseline


def _veths_of(container) -> list[int]:  # type: ignore[no-untyped-def]
    from runner import veth_ifindexes

    container.reload()
    return sorted(veth_ifindexes(int(container.attrs["State"]["Pid"])))


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
    command = [SENDER_IN_CONTAINER, str(SEND_SECONDS), "1000"]
    command += [f"{UPSTREAM_V4_BLOCKME}:{blocked.port}", f"{UPSTREAM_V4}:{allowed.port}"]
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
        baseline, leaks = blocked.counts()[0], []
        for _ in range(TRIALS):
            before = lab.client.containers.get(name).id
            subprocess.run(
                [*compose, "up", "-d", "--force-recreate"], check=True, capture_output=True, timeout=120
            )
            assert lab.client.containers.get(name).id != before  # a new container, the same name
            keeps_receiving(allowed)
            leaks.append(blocked.counts()[0] - baseline - sum(leaks))
    finally:
        subprocess.run([*compose, "down", "-t", "0"], capture_output=True, timeout=120)
    print(f"\nleaks per compose --force-recreate trial: {leaks}")
    assert leaks == [0] * TRIALS


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
    baseline, leaks = blocked.counts()[0], []
    try:
        for _ in range(max(1, TRIALS // 3)):
            _restart_dockerd()
            keeps_receiving(allowed, timeout=60)  # dockerd brought the container back, and it sends
            leaks.append(blocked.counts()[0] - baseline - sum(leaks))
    finally:
        _ensure_dockerd()
    print(f"\nleaks per dockerd restart trial: {leaks}")
    assert leaks == [0] * len(leaks)
    # the engine went away under the agent: its calls failed, were retried, and are counted
    status = read_live()
    assert status is not None and status.refresh_retries > 0
