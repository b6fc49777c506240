"""The cross-process lifecycle for real: root-only lock files, bounded waits that name the
holder, holders known by a lock (no pid to reuse or to misread across namespaces), a flow table nobody swaps."""

from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from lab import UPSTREAM_V4, Lab, wait_until
from runner import EgressTop, nothing_left_behind, run_cli, veth_ifindexes

from agent.datapath import RUN_DIR, PinnedMap, live_holders, open_datapath, our_filters, pins_exist, program
from agent.datapath.lifecycle import exclusive, start_loading
from agent.datapath.maps import PIN_DIR
from agent.datapath.program_cache import CACHE_DIR_ENV
from agent.datapath.syscalls import fd_info
from agent.errors import EXIT_PERMISSION, EXIT_STORE, UserError
from agent.lockfile import bounded_lock, private_dir
from agent.policy import RuleStore

NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
LOCK_BOUND = 1.0  # EGRESS_TOP_LOCK_TIMEOUT for the commands under test


@pytest.fixture(autouse=True)
def state_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, lab: Lab) -> Iterator[Path]:
    yield from nothing_left_behind(tmp_path, monkeypatch)


@pytest.fixture
def open_parent() -> Iterator[Path]:
    """A directory every user may enter (pytest's tmp_path is 0700, which would prove nothing)."""
    with tempfile.TemporaryDirectory(prefix="ett-open-") as parent:
        os.chmod(parent, 0o755)
        yield Path(parent)


def as_nobody(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*NOBODY, *command], capture_output=True, text=True, timeout=30)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class Holder:
    """Another process of ours holding a lock until stopped; it prints 'held' once it has it."""

    def __init__(self, code: str, env: dict[str, str] | None = None):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "held"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=10)


HOLD_DATAPATH = "import time\nfrom agent.datapath import exclusive\nwith exclusive():\n    print('held', flush=True)\n    time.sleep(120)\n"
HOLD_STORE = "import time\nfrom agent.policy import RuleStore\nwith RuleStore().transaction():\n    print('held', flush=True)\n    time.sleep(120)\n"


def block_within_the_lock_bound() -> subprocess.CompletedProcess[str]:
    """egress-block of a pending rule, its every wait on a lock bounded by LOCK_BOUND."""
    return run_cli(
        "egress-block",
        "ett-later",
        "198.51.100.9",
        "--pending",
        env={"EGRESS_TOP_LOCK_TIMEOUT": str(LOCK_BOUND)},
    )


# --- root only ---------------------------------------------------------------------------


def test_runtime_dir_lock_and_store_are_root_only(open_parent: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = open_parent / "state"
    monkeypatch.setenv("EGRESS_TOP_STATE_DIR", str(state))
    result = run_cli("egress-top", "--json", "-n", "1", "-i", "0.1")
    assert result.returncode == 0, result.stderr
    RuleStore().add("web", "198.51.100.7", action="block", pending=True)  # the store only: no kernel
    assert (mode(RUN_DIR), mode(RUN_DIR / "lock"), mode(RUN_DIR / "holders")) == (0o700, 0o600, 0o700)
    assert (mode(state), mode(state / "rules.json"), mode(state / "rules.lock")) == (0o700, 0o600, 0o600)

    control = open_parent / "control"  # nobody can reach the parent: the denials below are our modes
    control.write_text("readable\n")
    assert as_nobody("cat", str(control)).stdout == "readable\n"
    for lock in (RUN_DIR / "lock", state / "rules.lock"):
        denied = as_nobody("flock", "-n", str(lock), "true")
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    denied = as_nobody("cat", str(state / "rules.json"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    rules = run_cli("egress-rules", prefix=NOBODY, env={"EGRESS_TOP_STATE_DIR": str(state)})
    assert rules.returncode == EXIT_PERMISSION and rules.stdout == "", rules
    assert rules.stderr.count("\n") == 1 and "permission denied" in rules.stderr, rules.stderr


def test_a_symlink_is_never_followed_nor_its_target_truncated(tmp_path: Path) -> None:
    target = tmp_path / "precious"
    target.write_text("keep me\n")
    runtime = private_dir(tmp_path / "run")
    (runtime / "lock").symlink_to(target)
    with pytest.raises(UserError) as raised, bounded_lock(runtime / "lock", "the datapath"):
        pass
    assert "is a symlink" in str(raised.value) and raised.value.exit_code == EXIT_PERMISSION
    assert target.read_text() == "keep me\n"

    (tmp_path / "linked-run").symlink_to(runtime)
    with pytest.raises(UserError) as raised:
        private_dir(tmp_path / "linked-run")
    assert "not a directory (a symlink?)" in str(raised.value)

    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(UserError) as raised:
        private_dir(foreign)
    assert "owned by uid 65534, not 0" in str(raised.value)


# --- bounded waits ---------------------------------------------------------------------


def test_a_held_datapath_lock_fails_egress_block_in_bound_saying_what_it_left(state_dir: Path) -> None:
    holder = Holder(HOLD_DATAPATH)
    try:
        started = time.monotonic()
        result = block_within_the_lock_bound()
        took = time.monotonic() - started
    finally:
        holder.stop()
    assert result.returncode == EXIT_STORE, result.stderr
    [line] = result.stderr.splitlines()
    assert f"stayed locked by pid {holder.proc.pid} for 1s" in line, line
    assert f"rule 1 (ett-later block 198.51.100.9/32 any) is saved in {state_dir / 'rules.json'}" in line, (
        line
    )
    assert "NOT in force in the kernel" in line and "run the same command again" in line, line
    assert took < LOCK_BOUND + 5, took  # the wait itself is bounded; the rest is start-up
    assert [r.dest for r in RuleStore(state_dir).rules()] == ["198.51.100.9/32"]  # as the line says

    again = run_cli("egress-block", "ett-later", "198.51.100.9", "--pending")
    assert again.returncode == 0 and again.stdout.startswith("replaced rule 1"), again.stderr
    assert run_cli("egress-unblock", "ett-later", "--all").returncode == 0


def test_a_held_store_lock_fails_egress_block_in_bound_and_changes_nothing(state_dir: Path) -> None:
    RuleStore(state_dir).add("ett-later", "198.51.100.8", action="block", pending=True)
    before = (state_dir / "rules.json").read_bytes()
    holder = Holder(HOLD_STORE)
    try:
        result = block_within_the_lock_bound()
    finally:
        holder.stop()
    assert result.returncode == EXIT_STORE, result.stderr
    [line] = result.stderr.splitlines()
    assert f"rule store {state_dir / 'rules.json'} stayed locked by pid {holder.proc.pid}" in line, line
    assert (state_dir / "rules.json").read_bytes() == before
    RuleStore(state_dir).remove_all("ett-later")


# --- holders -----------------------------------------------------------------------------


HOLD_AS_HOLDER = (
    "import time\nfrom agent.datapath.lifecycle import exclusive, register_holder\n"
    "with exclusive():\n    register_holder()\nprint('held', flush=True)\ntime.sleep(120)\n"
)


def test_a_holder_is_live_by_its_lock_not_its_pid(lab: Lab) -> None:
    """A live holder keeps the datapath, even from another pid namespace (a Swarm task's pid
    means nothing on the host); a file nobody locks, whatever pid it names, does not."""
    container = lab.container("stale", network=lab.network())
    veths = veth_ifindexes(lab.pid(container))
    # control: a holder in its own pid namespace (its pid there is 1) keeps the program attached
    in_pid_namespace = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c", HOLD_AS_HOLDER],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert in_pid_namespace.stdout is not None
        assert in_pid_namespace.stdout.readline().strip() == "held"
        [record] = [p.name for p in (RUN_DIR / "holders").iterdir()]
        assert record.startswith("1-")  # the pid it has in its namespace
        assert run_cli("egress-top", "--json", "-n", "1", "-i", "0.1").returncode == 0
        assert veths <= set(our_filters()) and pins_exist()
        with exclusive():
            assert live_holders() == [record]

        # a record whose process is gone (kill -9 releases the lock) and one naming a live pid
        # that never locked it are both departed: the next one in sweeps them, the last one out cleans
        in_pid_namespace.kill()
        in_pid_namespace.wait(timeout=10)
        (RUN_DIR / "holders" / f"{os.getpid()}-forged").write_text("")
        result = run_cli("egress-top", "--json", "-n", "1", "-i", "0.1")
        assert result.returncode == 0, result.stderr
        assert sorted(p.name for p in (RUN_DIR / "holders").iterdir()) == []
        assert set(our_filters()) & veths == set() and not pins_exist()
    finally:
        in_pid_namespace.kill()
        in_pid_namespace.wait()


# --- the flow table and the pinned program ------------------------------------------------


def program_id(ifindex: int) -> int:
    """The kernel's id of the program in our filter on the veth (a new load gets a new id)."""
    shown = subprocess.run(
        ["tc", "filter", "show", "dev", socket.if_indextoname(ifindex), "ingress"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    [found] = re.findall(r"egress_top_ingress.* id (\d+)", shown)
    return int(found)


def test_a_second_egress_top_with_another_flow_table_size_keeps_the_table(lab: Lab, upstream) -> None:
    container = lab.container("table", network=lab.network())
    veths = veth_ifindexes(lab.pid(container))
    first = EgressTop()
    try:
        first.wait_attached(veths)
        resident = Path(f"/proc/{first.proc.pid}/maps").read_text()
        assert "libbcc" not in resident and "LLVM" not in resident  # the loader was a child
        [veth] = veths
        program_before = program_id(veth)
        second = run_cli("egress-top", "--json", "-n", "1", "-i", "0.1", "--flow-table-size", "2048")
        assert second.returncode == 0, second.stderr
        assert program_id(veth) == program_before  # the pinned program, re-attached: no new compile
        assert second.stderr == (
            "egress-top: keeping the pinned flow table of 65536 entries (another egress-top, the agent "
            "or rules use it): --flow-table-size 2048 applies once none of them runs\n"
        )
        flows = PinnedMap(PIN_DIR / "flows")
        try:
            assert flows.max_entries == 65536
        finally:
            flows.close()
        src_port = lab.send_udp(container, UPSTREAM_V4, 5301, count=4, size=10)
        key = (lab.ip(container), src_port, UPSTREAM_V4, 5301, "udp")
        wait_until(lambda: first.flows_of(container.name).get(key, {}).get("packets") == 4, timeout=5)
    finally:
        assert first.stop() == 0, first.stderr


# --- a first start: the compile beside the caller's start-up ---------------------------------


@pytest.fixture
def empty_program_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A first start on this kernel: nothing pinned, nothing compiled for it yet."""
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "program-cache"))
    assert not PIN_DIR.exists(), "not a first start: something of ours is pinned"


def test_two_first_starts_at_once_open_the_one_build_the_early_loader_pinned(
    empty_program_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    fallback_compiles: list[int] = []
    monkeypatch.setattr(program, "run_loader", lambda size, pin_dir: fallback_compiles.append(size))
    first, second = start_loading(), start_loading()  # both before any lock, as two front ends
    assert first is not None and second is not None
    with open_datapath(loading=first) as one, open_datapath(loading=second) as other:
        assert pins_exist()
        assert start_loading() is None  # pinned now: nothing to start
        program_pins = sorted(path.name for path in PIN_DIR.glob(f"{program.PROGRAM_PIN_PREFIX}*"))
        assert len(program_pins) == 1, program_pins
        assert fd_info(one.program_fd)["prog_id"] == fd_info(other.program_fd)["prog_id"]
    assert fallback_compiles == []  # the second child found the first one's pins under the lock
    assert not PIN_DIR.exists()  # the last one out unpinned (no rules)
    assert start_loading() is None  # the build is cached: a later start loads it without BCC


def test_the_early_loader_takes_the_datapath_lock_and_fails_in_bound_when_held(
    empty_program_cache: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EGRESS_TOP_LOCK_TIMEOUT", str(LOCK_BOUND))
    holder = Holder(HOLD_DATAPATH)
    try:
        loading = start_loading()
        assert loading is not None
        started = time.monotonic()
        with pytest.raises(UserError) as refused, open_datapath(loading=loading):
            pass
        assert time.monotonic() - started < LOCK_BOUND + 5
    finally:
        holder.stop()
    assert re.fullmatch(
        rf"the datapath stayed locked by pid {holder.proc.pid} for 1s \(.*/lock\); try again when it finishes",
        str(refused.value),
    ), str(refused.value)
    assert refused.value.exit_code == EXIT_STORE
    assert not PIN_DIR.exists()  # the child compiled nothing without the lock
