"""Deploying the agent for real: fleet rule files, the systemd unit's capabilities, the image
and the Swarm stack. Every count is what the upstream sink received or the datapath dropped."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from lab import UPSTREAM_V4, UPSTREAM_V4_BLOCKME, Lab, wait_until
from runner import BIN, Agent, nothing_left_behind, parse_records, run_cli, veth_ifindexes
from test_system_enforcement import delivered

from agent.datapath import our_filters

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


def rule_file(tmp_path: Path, containers: dict[str, list[dict[str, object]]]) -> Path:
    path = tmp_path / "fleet-rules.json"
    path.write_text(json.dumps({"version": 1, "containers": containers}))
    return path


def exported_packets(export: Path, container_name: str, src_port: int) -> int:
    """Packets the export file holds for one flow source of a container (0 before the file exists)."""
    records = parse_records(export.read_text()) if export.exists() else []
    return sum(
        r["packets_delta"]
        for r in records
        if r["container_name"] == container_name and r["src_port"] == src_port
    )


def test_rule_file_apply_is_live_when_it_returns_idempotent_and_leaves_others(
    tmp_path: Path, lab: Lab, upstream
) -> None:
    net = lab.network()
    web, other = lab.container("web", network=net), lab.container("other", network=net)
    sink = upstream.udp_sink(5300)
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5300) == 5  # control: it passes before
    cli = run_cli("egress-block", other.name, UPSTREAM_V4)
    assert cli.returncode == 0, cli.stderr

    blocking = rule_file(
        tmp_path,
        {web.name: [{"action": "block", "dest": f"{UPSTREAM_V4_BLOCKME}/32", "port": 5300, "proto": "udp"}]},
    )
    dry = run_cli("egress-rules", "apply", "--dry-run", str(blocking))
    assert dry.stdout.splitlines()[0] == f"+ {web.name}: block {UPSTREAM_V4_BLOCKME}/32 udp/5300", dry.stdout
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5300) == 5  # the dry run changed nothing

    applied = run_cli("egress-rules", "apply", str(blocking))
    assert applied.returncode == 0, applied.stderr
    assert applied.stdout.splitlines()[-1] == f"applied {blocking}: 1 rules added, 0 removed"
    # No waiting: in force when the command returns.
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5300) == 0
    assert delivered(lab, sink, web, UPSTREAM_V4, 5300) == 5  # another destination still passes
    assert delivered(lab, sink, other, UPSTREAM_V4, 5300) == 0  # not named in the file: its rule stays

    again = run_cli("egress-rules", "apply", str(blocking))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"applied {blocking}: no changes (every named container already has exactly these rules)"
    ]

    emptied = rule_file(tmp_path, {web.name: [], other.name: []})
    cleared = run_cli("egress-rules", "apply", str(emptied))
    assert cleared.returncode == 0, cleared.stderr
    assert sorted(cleared.stdout.splitlines()[:-1]) == sorted(
        [
            f"- {web.name}: block {UPSTREAM_V4_BLOCKME}/32 udp/5300",
            f"- {other.name}: block {UPSTREAM_V4}/32 any",
        ]
    )
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5300) == 5
    assert delivered(lab, sink, other, UPSTREAM_V4, 5300) == 5
    assert run_cli("egress-rules", "--json").stdout == ""


# --- the systemd unit ------------------------------------------------------------------

UNIT = DEPLOY / "egress-agent.service"


def unit_setting(name: str) -> list[str]:
    [line] = [line for line in UNIT.read_text().splitlines() if line.startswith(f"{name}=")]
    return line.partition("=")[2].split()


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart exists: point it at this checkout's agent
    unit = tmp_path / "egress-agent.service"
    unit.write_text(UNIT.read_text().replace("/opt/egress-top/.venv/bin/", f"{BIN}/"))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


@dataclass
class Outcome:
    counted: bool
    why: str


def agent_outcome(lab: Lab, container, tmp_path: Path, capabilities: list[str], port: int) -> Outcome:
    """Run the agent as root whose capabilities are exactly `capabilities` (the unit runs
    it as root with CapabilityBoundingSet=), and say whether it attached and counted."""
    export = tmp_path / f"caps-{port}.ndjson"
    bounding = ",".join(["-all", *(f"+{cap.removeprefix('CAP_').lower()}" for cap in capabilities)])
    agent = Agent(
        "-i",
        "0.2",
        "--metrics",
        "off",
        "--export",
        str(export),
        prefix=("setpriv", f"--bounding-set={bounding}", "--inh-caps=-all", "--"),
    )
    try:
        try:
            agent.wait_ready()
        except AssertionError:
            return Outcome(False, (agent.stderr_lines or ["exited"])[-1])
        src_port = lab.send_udp(container, UPSTREAM_V4, port, count=10, size=32)

        def counted() -> tuple[int, int]:
            """(datagrams of the flow, those of them named after the container)."""
            records = parse_records(export.read_text()) if export.exists() else []
            flow = [r for r in records if (r["src_port"], r["dst_port"]) == (src_port, port)]
            named = [r for r in flow if r["container_name"] == container.name]
            return sum(r["packets_delta"] for r in flow), sum(r["packets_delta"] for r in named)

        try:
            wait_until(lambda: counted() == (10, 10), timeout=5)
        except AssertionError:
            total, named = counted()
            return Outcome(False, f"ready, counted {total} of 10 datagrams, {named} under {container.name}")
        return Outcome(True, "counted 10 of 10")
    finally:
        agent.stop()


def test_the_units_capabilities_are_enough_and_each_is_needed(tmp_path: Path, lab: Lab, upstream) -> None:
    capabilities = unit_setting("CapabilityBoundingSet")
    assert unit_setting("AmbientCapabilities") == capabilities
    # not root inside: its /proc/PID/ns/net would take CAP_SYS_PTRACE, its sandbox file does not
    container = lab.container("caps", network=lab.network(), user="1000:1000")
    upstream.udp_sink(5310)
    full = agent_outcome(lab, container, tmp_path, capabilities, 5310)
    assert full.counted, full.why
    without = {
        cap: agent_outcome(lab, container, tmp_path, [c for c in capabilities if c != cap], 5310)
        for cap in capabilities
    }
    assert {cap: outcome.why for cap, outcome in without.items() if outcome.counted} == {}
    # and what the unit's comment says each one is for
    assert "needs root (CAP_BPF and CAP_NET_ADMIN)" in without["CAP_NET_ADMIN"].why
    assert "needs root (CAP_BPF and CAP_NET_ADMIN)" in without["CAP_SYS_ADMIN"].why


# --- the image -------------------------------------------------------------------------

SANDBOXES = "/var/run/docker/netns"


@pytest.fixture
def sandbox_mounts_propagate() -> Iterator[None]:
    """The agent's container binds SANDBOXES rslave, which Docker allows only from a shared (or slave)
    host mount; systemd makes every mount shared, this VM's init leaves / private. Shared for
    the test (the mount holding SANDBOXES, only that one) if it is not, as it was afterwards."""
    found = subprocess.run(
        ["findmnt", "-n", "-o", "TARGET,PROPAGATION", "-T", SANDBOXES],
        capture_output=True,
        text=True,
        timeout=10,
    )
    target, propagation = found.stdout.split()
    if "shared" in propagation.split(","):
        yield
        return
    subprocess.run(["mount", "--make-shared", target], check=True, timeout=10)
    try:
        yield
    finally:
        subprocess.run(["mount", f"--make-{propagation.split(',')[0]}", target], check=True, timeout=10)


AGENT_MOUNTS = {  # host path -> (container path, mode); what each is for: README "Deploy"
    "/sys/fs/bpf": ("/sys/fs/bpf", "rw"),
    "/run/egress-top": ("/run/egress-top", "rw"),
    "/var/run/docker.sock": ("/var/run/docker.sock", "rw"),
    SANDBOXES: (SANDBOXES, "ro,rslave"),
    "/lib/modules": ("/lib/modules", "ro"),
    "/usr/src": ("/usr/src", "ro"),
}


@pytest.fixture(scope="session")
def agent_image(docker_client) -> str:
    """Built once per session; scripts/build-image.sh caches base and image by content hash."""
    result = subprocess.run(
        [str(REPO / "scripts" / "build-image.sh")], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.split()[-1]


def blocking_rules(tmp_path: Path, container_name: str, port: int) -> Path:
    return rule_file(
        tmp_path,
        {container_name: [{"action": "block", "dest": UPSTREAM_V4_BLOCKME, "port": port, "proto": "udp"}]},
    )


def ready_or_exited(agent) -> bool:
    agent.reload()
    return agent.status == "exited" or "egress-agent: ready:" in agent.logs().decode()


def test_the_image_attaches_counts_and_enforces(
    tmp_path: Path, state_dir: Path, lab: Lab, upstream, agent_image: str, sandbox_mounts_propagate: None
) -> None:
    net = lab.network()
    web = lab.container("imaged", network=net)
    sink = upstream.udp_sink(5320)
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5320) == 5  # control before any agent
    rules = blocking_rules(tmp_path, web.name, 5320)
    export_dir = tmp_path / "export"
    export_dir.mkdir()
    Path("/run/egress-top").mkdir(exist_ok=True)
    state_dir.mkdir(mode=0o700, exist_ok=True)
    volumes = {host: {"bind": inside, "mode": mode} for host, (inside, mode) in AGENT_MOUNTS.items()}
    volumes |= {
        str(state_dir): {"bind": "/var/lib/egress-top", "mode": "rw"},
        str(export_dir): {"bind": "/export", "mode": "rw"},
        str(rules): {"bind": "/etc/egress-top/rules.json", "mode": "ro"},
    }
    agent = lab.client.containers.run(
        agent_image,
        [
            "run",
            "-i",
            "0.2",
            "--metrics",
            "off",
            "--export",
            "/export/flows.ndjson",
            "--apply-rules",
            "/etc/egress-top/rules.json",
        ],
        name=f"{web.name}-agent",
        detach=True,
        # not --privileged: the unit's capabilities suffice (and this dockerd cannot grant
        # CAP_SYS_RESOURCE, so --privileged fails to start here)
        cap_add=["NET_ADMIN", "SYS_ADMIN"],
        network_mode="host",
        pid_mode="host",
        volumes=volumes,
    )
    try:
        wait_until(lambda: ready_or_exited(agent), timeout=60)
        logs = agent.logs().decode()
        assert "egress-agent: ready:" in logs, logs
        assert "applied /etc/egress-top/rules.json: 1 rules added, 0 removed" in logs
        # enforcing: the blocked flow gets nothing through; counting: exact datagrams exported
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5320) == 0
        src_port = lab.send_udp(web, UPSTREAM_V4, 5320, count=7, size=32)
        export = export_dir / "flows.ndjson"
        wait_until(lambda: exported_packets(export, web.name, src_port) == 7, timeout=10)
        assert sink.wait_for(5 + 7, timeout=5) == (5 + 7, (5 + 7) * 32)  # the control's 5, none blocked, 7
    finally:
        agent.stop(timeout=15)
        exit_code = agent.wait(timeout=15)["StatusCode"]
        agent.remove(force=True)
    assert exit_code == 0
    # the rule stays in force after the agent stops (SIGTERM leaves rules enforced); remove it
    cleared = run_cli("egress-rules", "apply", str(rule_file(tmp_path, {web.name: []})))
    assert cleared.returncode == 0, cleared.stderr
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5320) == 5


# --- the Swarm stack -------------------------------------------------------------------


def docker_cli(*args: str, env: dict[str, str] | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["docker", *args], capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})}
    )
    assert not check or result.returncode == 0, f"docker {args}: {result.stderr}"
    return result.stdout


STACK_LABEL = "com.docker.stack.namespace"


def stack_containers(lab: Lab, stack: str) -> list:
    return lab.client.containers.list(filters={"label": f"{STACK_LABEL}={stack}"})


def test_the_swarm_stack_counts_and_enforces(
    tmp_path: Path, state_dir: Path, lab: Lab, upstream, agent_image: str, sandbox_mounts_propagate: None
) -> None:
    assert lab.client.info()["Swarm"]["LocalNodeState"] == "inactive", "this host is in a swarm already"
    net = lab.network()
    web = lab.container("swarmed", network=net)
    sink = upstream.udp_sink(5330, lifetime=300)
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5330) == 5  # control before any agent
    stack, config = f"{web.name}-stack", f"{web.name}-rules-1"
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    state_dir.mkdir(mode=0o700, exist_ok=True)
    for bound in ("/run/egress-top", "/var/cache/egress-top"):  # Swarm binds only what exists
        Path(bound).mkdir(mode=0o700, exist_ok=True)
    env = {
        "EGRESS_TOP_IMAGE": agent_image,
        "EGRESS_TOP_RULES_CONFIG": config,
        "EGRESS_TOP_STATE_DIR": str(state_dir),
        "EGRESS_TOP_LOG_DIR": str(log_dir),
    }
    gwbridge_before = any(n.name == "docker_gwbridge" for n in lab.client.networks.list())
    with contextlib.ExitStack() as cleanup:
        # unwound in reverse whatever failed: a swarm left active breaks the host
        if not gwbridge_before:  # swarm init makes it, leave keeps it: removed after leave
            cleanup.callback(docker_cli, "network", "rm", "docker_gwbridge", check=False)
        cleanup.callback(docker_cli, "swarm", "leave", "--force", check=False)
        docker_cli("swarm", "init", "--advertise-addr", "127.0.0.1")
        docker_cli("config", "create", config, str(blocking_rules(tmp_path, web.name, 5330)))
        cleanup.callback(docker_cli, "config", "rm", config, check=False)
        cleanup.callback(lambda: wait_until(lambda: not stack_containers(lab, stack), 60))
        cleanup.callback(docker_cli, "stack", "rm", stack, check=False)
        docker_cli("stack", "deploy", "-c", str(DEPLOY / "stack.yml"), stack, env=env)

        def ready_task():
            found = stack_containers(lab, stack)
            return found[0] if found and "egress-agent: ready:" in found[0].logs().decode() else None

        try:
            agent = wait_until(ready_task, timeout=90)
        except AssertionError:
            tasks = docker_cli("service", "ps", "--no-trunc", f"{stack}_agent", check=False)
            logs = subprocess.run(
                ["docker", "service", "logs", f"{stack}_agent"], capture_output=True, text=True, timeout=60
            )
            raise AssertionError(
                f"no ready agent task:\n{tasks}\n{(logs.stdout + logs.stderr)[-2000:]}"
            ) from None
        logs = agent.logs().decode()
        assert "applied /etc/egress-top/rules.json: 1 rules added, 0 removed" in logs, logs
        assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5330) == 0  # the config's rule, enforced
        src_port = lab.send_udp(web, UPSTREAM_V4, 5330, count=9, size=32)
        export = log_dir / "flows.ndjson"
        wait_until(lambda: exported_packets(export, web.name, src_port) == 9, timeout=10)
        # a container started after the agent: its sandbox reached the task (rslave)
        late = lab.container("swarmed-late", network=net)
        late_port = lab.send_udp(late, UPSTREAM_V4, 5330, count=4, size=32)
        wait_until(lambda: exported_packets(export, late.name, late_port) == 4, timeout=10)
        # the task's pid means nothing on the host, its locks do: the host sees the agent running,
        # and a host egress-top that comes and goes leaves the agent's veths attached
        seen = run_cli("egress-agent", "status")
        assert "not running" not in seen.stdout and "pid " in seen.stdout, seen.stdout
        late_veths = veth_ifindexes(lab.pid(late))
        assert run_cli("egress-top", "--json", "-n", "1", "-i", "0.1").returncode == 0
        assert late_veths <= set(our_filters())
        again = lab.send_udp(late, UPSTREAM_V4, 5330, count=3, size=32)
        wait_until(lambda: exported_packets(export, late.name, again) == 3, timeout=10)
        # the control's 5, none of the blocked 5, then 9, 4 and 3
        assert sink.wait_for(5 + 9 + 4 + 3, timeout=5) == (5 + 9 + 4 + 3, (5 + 9 + 4 + 3) * 32)
    assert lab.client.info()["Swarm"]["LocalNodeState"] == "inactive"
    assert gwbridge_before == any(n.name == "docker_gwbridge" for n in lab.client.networks.list())
    cleared = run_cli("egress-rules", "apply", str(rule_file(tmp_path, {web.name: []})))
    assert cleared.returncode == 0, cleared.stderr
    assert delivered(lab, sink, web, UPSTREAM_V4_BLOCKME, 5330) == 5
