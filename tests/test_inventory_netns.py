"""Which file the inventory enters a container's netns by (agent/inventory.py netns_file).

Pure logic: a fake says which paths are netns files; is_netns itself is checked on this
process's own netns and on a plain file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.inventory import is_netns, netns_file

SANDBOX = "/var/run/docker/netns/3f2a9c1b7d4e"


def inspected(sandbox_key: str = SANDBOX, pid: int = 4242) -> dict[str, Any]:
    return {"State": {"Running": True, "Pid": pid}, "NetworkSettings": {"SandboxKey": sandbox_key}}


def test_the_sandbox_file_comes_first() -> None:
    # an agent in its own pid namespace (a Swarm task) sees the sandbox, not the pid
    assert netns_file(inspected(), usable={SANDBOX}.__contains__) == SANDBOX
    assert netns_file(inspected(), usable={SANDBOX, "/proc/4242/ns/net"}.__contains__) == SANDBOX


def test_the_process_netns_when_the_sandbox_is_not_a_netns_here() -> None:
    # not bind-mounted, or bound without rslave (only the empty mount point is seen)
    assert netns_file(inspected(), usable={"/proc/4242/ns/net"}.__contains__) == "/proc/4242/ns/net"
    assert netns_file(inspected(sandbox_key=""), usable={"/proc/4242/ns/net"}.__contains__) == (
        "/proc/4242/ns/net"
    )


def test_none_when_neither_is_visible() -> None:
    assert netns_file(inspected(), usable=set[str]().__contains__) is None
    assert netns_file(inspected(sandbox_key="", pid=0), usable=lambda _path: True) is None


def test_is_netns_tells_a_netns_file_from_a_plain_one(tmp_path: Path) -> None:
    mount_point = tmp_path / "3f2a9c1b7d4e"
    mount_point.touch()  # what a sandbox's mount point is where its mount is absent
    assert is_netns("/proc/self/ns/net")
    assert not is_netns(str(mount_point))
    assert not is_netns(str(tmp_path / "gone"))
