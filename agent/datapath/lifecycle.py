"""Who has the datapath open, across processes, and who turns off the lights.

egress-top, egress-block and egress-agent may run at once. Each process that opens
the datapath records itself as a holder under RUN_DIR: a file it keeps flock'ed for
its whole life. The kernel drops the lock however the process ends (kill -9 too), so
a file nobody locks is a departed holder; no pid is compared, so a reused pid cannot
pass for a holder and an agent in another pid namespace (a Swarm task, which has no
--pid host) is seen as live through the bind-mounted RUN_DIR. The last holder to
leave detaches every veth whose container has no rules and, when no rule is left
at all, removes the pins too. Only enforcement outlives the processes.

RUN_DIR is root's alone (0700, its files 0600, never followed through a symlink):
a lock anyone could take would let them stall enforcement. Every wait on the lock
is bounded and names the holder (agent/lockfile.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from agent.datapath.attach import detach, our_filters
from agent.datapath.maps import DEFAULT_FLOW_TABLE_SIZE, PIN_DIR, Maps, open_pinned_maps
from agent.datapath.program import Datapath, LoaderChild, needs_compile, start_loader
from agent.datapath.system import check_privileges, ensure_bpffs
from agent.lockfile import bounded_lock, open_private, private_dir

log = logging.getLogger(__name__)

RUN_DIR = Path("/run/egress-top")


@contextlib.contextmanager
def exclusive(timeout: float | None = None) -> Iterator[None]:
    """Serialises attach/detach, policy syncs and holder changes across our processes:
    two writers syncing the trie from different store versions would undo each other."""
    with bounded_lock(private_dir(RUN_DIR) / "lock", "the datapath", timeout=timeout):
        yield


# --- holders -------------------------------------------------------------------------


def _holders_dir() -> Path:
    return private_dir(private_dir(RUN_DIR) / "holders")


@dataclass
class Holder:
    """This process's record; the open fd holds the lock that says it is alive."""

    path: Path
    fd: int

    def leave(self) -> None:
        self.path.unlink(missing_ok=True)
        os.close(self.fd)


def register_holder() -> Holder:
    """Call under exclusive(): live_holders() sweeps unlocked files under the same lock,
    so it never sees this file between its creation and its flock."""
    # pid plus a random tag: pids of other pid namespaces may repeat ours. os.urandom, not
    # secrets: secrets imports hmac, which loads OpenSSL's libcrypto (+3.4 MB resident)
    path = _holders_dir() / f"{os.getpid()}-{os.urandom(4).hex()}"
    fd = open_private(path, os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return Holder(path, fd)


def is_locked(path: Path) -> bool:
    """Whether some process holds the flock of path (a live holder or agent)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def live_holders() -> list[str]:
    """Names of the records of processes holding the datapath now; the records of
    departed processes are removed. Call under exclusive()."""
    live = []
    for entry in _holders_dir().iterdir():
        if not entry.is_symlink() and is_locked(entry):
            live.append(entry.name)
        else:
            entry.unlink(missing_ok=True)  # died without leaving (kill -9), or not ours
    return sorted(live)


def start_loading(flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE) -> LoaderChild | None:
    """On a first start (see program.needs_compile) start the compile now, in the loader
    child, so the caller's own start-up (imports, Docker) runs beside it; hand the child
    to open_datapath. None when opening the datapath compiles nothing."""
    check_privileges()
    ensure_bpffs()
    if not needs_compile(flow_table_size):
        return None
    return start_loader(flow_table_size, PIN_DIR, exclusive=True)


@contextlib.contextmanager
def open_datapath(
    flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE, loading: LoaderChild | None = None
) -> Iterator[Datapath]:
    """Load (or reuse the pins of) the datapath for the life of the with-block;
    loading: the child start_loading() gave, waited for first."""
    check_privileges()
    ensure_bpffs()
    if loading is not None:
        loading.wait()  # before our lock: the child holds it while it compiles
    holder: Holder | None = None
    datapath = None
    try:
        with exclusive():
            live_holders()  # the next one in sweeps the records of the departed
            holder = register_holder()
            # Under the lock: two first loads at once would both try to create the pins.
            datapath = Datapath(flow_table_size)
        yield datapath
    finally:
        if holder is not None:
            with exclusive():
                holder.leave()
            release_if_unheld(datapath)
        if datapath is not None:
            datapath.close()


def release_if_unheld(maps: Maps | None) -> None:
    """Last one out turns off the lights: with no process holding the datapath, keep
    attached only the veths that enforce a rule, and unpin when no rule is left."""
    with exclusive():
        if live_holders():
            return
        own_maps = maps is None
        maps = maps or open_pinned_maps()  # a failed load must not undo enforcement left pinned
        try:
            enforced = maps.policy_endpoints() if maps is not None else set()
            for ifindex in our_filters():
                if ifindex not in enforced:
                    detach(ifindex)
            if maps is None or (not enforced and maps.policy_entry_count() == 0):
                remove_pins()
        finally:
            if own_maps and maps is not None:
                maps.close()


def remove_pins() -> None:
    if PIN_DIR.parent.exists():
        shutil.rmtree(PIN_DIR.parent, ignore_errors=True)


def cleanup_everything() -> list[str]:
    """egress-agent cleanup: every attachment, pin and map of ours, whatever holds them."""
    removed = []
    with exclusive():
        for ifindex, name in our_filters().items():
            detach(ifindex)
            removed.append(f"filter on {name}")
        if PIN_DIR.parent.exists():
            removed.append(f"pins under {PIN_DIR.parent}")
        remove_pins()
    return removed
