"""Who has the datapath open, across processes, and who turns off the lights.

egress-top, egress-block and egress-agent may run at once. Each process that opens
the datapath records itself as a holder under RUN_DIR (its pid, with the process's
start time so a reused pid is not taken for a live holder). The last holder to
leave detaches every veth whose container has no rules and, when no rule is left
at all, removes the pins too. Only enforcement outlives the processes.

RUN_DIR is root's alone (0700, its files 0600, never followed through a symlink):
a lock anyone could take would let them stall enforcement. Every wait on the lock
is bounded and names the holder (agent/lockfile.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from agent.datapath.attach import detach, our_filters
from agent.datapath.maps import DEFAULT_FLOW_TABLE_SIZE, PIN_DIR, Maps, open_pinned_maps
from agent.datapath.program import Datapath
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


def process_start_time(pid: int) -> int | None:
    """Clock ticks after boot at which pid started (field 22 of /proc/PID/stat)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # the command name (field 2) may hold spaces and parentheses: count from the last ')'
    return int(text.rpartition(")")[2].split()[19])


def _holders_dir() -> Path:
    return private_dir(private_dir(RUN_DIR) / "holders")


def register_holder(pid: int | None = None) -> Path:
    pid = pid or os.getpid()
    path = _holders_dir() / str(pid)
    fd = open_private(path, os.O_WRONLY | os.O_TRUNC)
    try:
        os.write(fd, f"{process_start_time(pid)}\n".encode())
    finally:
        os.close(fd)
    return path


def live_holders() -> list[int]:
    """Pids holding the datapath now; records of departed processes are removed."""
    live = []
    for entry in _holders_dir().iterdir():
        pid = int(entry.name) if entry.name.isdigit() else None
        recorded = entry.read_text().strip() if pid is not None and not entry.is_symlink() else ""
        if pid is not None and recorded == str(process_start_time(pid)):
            live.append(pid)
        else:
            entry.unlink(missing_ok=True)  # died without leaving (kill -9), or its pid is reused
    return live


@contextlib.contextmanager
def open_datapath(flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE) -> Iterator[Datapath]:
    """Load (or reuse the pins of) the datapath for the life of the with-block."""
    check_privileges()
    ensure_bpffs()
    holder: Path | None = None
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
                holder.unlink(missing_ok=True)
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
