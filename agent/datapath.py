"""Datapath layer: compile and load bpf/egress.c, attach it to veths, read its maps.

Only this module talks to BPF and tc. Maps are pinned under PIN_DIR so that rules
and counters outlive the process; the tc filter keeps the program alive.

Lifecycle across processes (egress-top, egress-block, egress-agent may run at once):
each process that opens the datapath registers itself as a holder under RUN_DIR.
The last holder to leave turns off the lights: it detaches every veth whose
container has no rules and, when no rule is left at all, removes the pins too.
Only enforcement outlives the processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import importlib.resources
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from agent.errors import EXIT_KERNEL, EXIT_PERMISSION, UserError
from agent.headers import ensure_kernel_headers

log = logging.getLogger(__name__)

LAYOUT_VERSION = 1  # EGRESS_TOP_LAYOUT in bpf/egress_maps.h
BPFFS = Path("/sys/fs/bpf")
PIN_DIR = BPFFS / "egress-top" / f"v{LAYOUT_VERSION}"
RUN_DIR = Path("/run/egress-top")
PROGRAM_NAME = "egress_top_ingress"
# tc filter identity on the clsact ingress hook; "replace" at this prio/handle is atomic.
TC_INGRESS_PARENT = 0xFFFFFFF2
TC_FILTER_PRIO = 0xE7
TC_FILTER_HANDLE = 0xE7
DEFAULT_FLOW_TABLE_SIZE = 65536
POLICY_TABLE_SIZE = 131072
ENDPOINT_F_POLICY = 1
MAP_PINS = {
    "flows": "PIN_FLOWS",
    "endpoints": "PIN_ENDPOINTS",
    "policy_lpm": "PIN_POLICY",
    "rule_stats": "PIN_RULE_STATS",
    "ifindex_counters": "PIN_IFINDEX_COUNTERS",
    "datapath_stats": "PIN_DATAPATH_STATS",
}
STAT_FLOWS_CREATED = 0

# Mirrors of struct flow_key / struct flow_stats (bpf/egress_maps.h).
FLOW_KEY_DTYPE = np.dtype(
    [
        ("ifindex", "<u4"),
        ("family", "u1"),
        ("proto", "u1"),
        ("src_port", "<u2"),
        ("dst_port", "<u2"),
        ("pad", "<u2"),
        ("src_addr", "V16"),
        ("dst_addr", "V16"),
    ]
)
FLOW_STATS_DTYPE = np.dtype(
    [
        ("bytes", "<u8"),
        ("packets", "<u8"),
        ("first_seen_ns", "<u8"),
        ("last_seen_ns", "<u8"),
        ("dropped_bytes", "<u8"),
        ("dropped_packets", "<u8"),
        ("rule_id", "<u4"),
        ("verdict", "<u4"),
    ]
)
BATCH_CHUNK = 16384


@dataclass(frozen=True)
class FlowTableRead:
    """One read of the flow map: parallel arrays, plus when it was taken."""

    keys: np.ndarray  # FLOW_KEY_DTYPE
    stats: np.ndarray  # FLOW_STATS_DTYPE
    monotonic_ns: int


@dataclass(frozen=True)
class IfindexCounters:
    non_ip_packets: int
    non_ip_bytes: int
    dropped_packets: int
    dropped_bytes: int


@dataclass(frozen=True)
class RuleHits:
    packets: int
    bytes: int
    last_hit_ns: int


def check_privileges() -> None:
    """BPF and tc need CAP_BPF/CAP_SYS_ADMIN and CAP_NET_ADMIN; root has them."""
    caps = _effective_capabilities()
    cap_net_admin, cap_sys_admin, cap_bpf = 12, 21, 39
    has_bpf = bool(caps & (1 << cap_bpf)) or bool(caps & (1 << cap_sys_admin))
    if not has_bpf or not caps & (1 << cap_net_admin):
        raise UserError(
            "needs root (CAP_BPF and CAP_NET_ADMIN): run it with sudo", EXIT_PERMISSION
        )


def _effective_capabilities() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return 0


def ensure_bpffs() -> None:
    if os.path.ismount(BPFFS):
        return
    try:
        BPFFS.mkdir(parents=True, exist_ok=True)
        mounted = subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True).returncode == 0
    except OSError:
        mounted = False
    if not mounted or not os.path.ismount(BPFFS):
        raise UserError(
            f"cannot mount bpffs at {BPFFS}: run 'mount -t bpf bpf {BPFFS}' (the kernel needs CONFIG_BPF_SYSCALL)",
            EXIT_KERNEL,
        )


def _pinned_max_entries(path: Path) -> int | None:
    """max_entries of a pinned map, read from the fdinfo of a BPF_OBJ_GET fd."""
    if not path.exists():
        return None
    fd = _bpf_obj_get(path)
    try:
        for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
            if line.startswith("max_entries:"):
                return int(line.split()[1])
    finally:
        os.close(fd)
    return None


def _bpf_obj_get(path: Path) -> int:
    bpf_obj_get_cmd = 7
    sys_bpf = 321  # x86_64

    class ObjGetAttr(ctypes.Structure):
        _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]

    raw_path = ctypes.create_string_buffer(os.fsencode(path))
    attr = ObjGetAttr(ctypes.cast(raw_path, ctypes.c_void_p).value or 0, 0, 0)
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.syscall(sys_bpf, bpf_obj_get_cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        raise OSError(ctypes.get_errno(), f"BPF_OBJ_GET {path}")
    return fd


@contextlib.contextmanager
def _stderr_to(path: Path) -> Iterator[None]:
    """BCC and the verifier write to fd 2 from C: catch it for a one-line error."""
    saved = os.dup(2)
    with open(path, "w") as sink:
        os.dup2(sink.fileno(), 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


class Datapath:
    """The loaded program and its pinned maps. Use open_datapath() to get one."""

    def __init__(self, flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE, pin_dir: Path = PIN_DIR):
        self.flow_table_size = flow_table_size
        self.pin_dir = pin_dir
        self._bpf, self._fn = self._load()
        self.flows = self._bpf["flows"]
        self.endpoints = self._bpf["endpoints"]
        self.policy = self._bpf["policy_lpm"]
        self.rule_stats = self._bpf["rule_stats"]
        self.ifindex_counters = self._bpf["ifindex_counters"]
        self.datapath_stats = self._bpf["datapath_stats"]
        self._batch_supported = True

    # --- loading -----------------------------------------------------------------

    def _load(self):  # -> (bcc.BPF, bcc function)
        ensure_kernel_headers()
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self._drop_mismatched_flow_pin()
        from bcc import BPF  # imported late: costs ~70 MB and needs root

        source_dir = importlib.resources.files("agent.bpf")
        source = Path(str(source_dir / "egress.c"))
        cflags = [
            f"-I{source.parent}",
            f"-DFLOW_TABLE_SIZE={self.flow_table_size}",
            f"-DPOLICY_TABLE_SIZE={POLICY_TABLE_SIZE}",
            *(f'-D{macro}="{self.pin_dir / name}"' for name, macro in MAP_PINS.items()),
        ]
        with tempfile.TemporaryDirectory(prefix="egress-top-") as tmp:
            log_path = Path(tmp) / "bcc.log"
            try:
                with _stderr_to(log_path):
                    bpf = BPF(src_file=str(source).encode(), cflags=cflags)
                    fn = bpf.load_func(PROGRAM_NAME.encode(), BPF.SCHED_CLS)
            except Exception as exc:
                lines = log_path.read_text(errors="replace").strip().splitlines()
                reason = next((line for line in lines if "error" in line.lower()), str(exc))
                raise UserError(
                    f"the kernel refused the BPF program ({reason.strip()}): run with --verbose for the full log",
                    EXIT_KERNEL,
                    detail="\n".join(lines[-40:]),
                ) from None
        return bpf, fn

    def _drop_mismatched_flow_pin(self) -> None:
        """A pinned flow map of another size would be reused silently: replace it."""
        pinned = _pinned_max_entries(self.pin_dir / "flows")
        if pinned is not None and pinned != self.flow_table_size:
            log.warning(
                "flow table was pinned with %d entries, now %d: starting a new flow table",
                pinned,
                self.flow_table_size,
            )
            (self.pin_dir / "flows").unlink()

    # --- attach / detach ------------------------------------------------------------

    def attach(self, ifindex: int) -> None:
        """Put the program on the veth's ingress hook (the container's egress)."""
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        with IPRoute() as ipr:
            try:
                ipr.tc("add", "clsact", ifindex)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            ipr.tc(
                "replace-filter",
                "bpf",
                ifindex,
                TC_FILTER_HANDLE,
                fd=self._fn.fd,
                name=PROGRAM_NAME,
                parent=TC_INGRESS_PARENT,
                prio=TC_FILTER_PRIO,
                classid=1,
                direct_action=True,
            )

    def close(self) -> None:
        self._bpf.cleanup()

    # --- maps -------------------------------------------------------------------------

    def read_flows(self) -> FlowTableRead:
        keys = np.empty(self.flow_table_size, FLOW_KEY_DTYPE)
        stats = np.empty(self.flow_table_size, FLOW_STATS_DTYPE)
        count = self._lookup_batch(keys, stats) if self._batch_supported else None
        if count is None:
            self._batch_supported = False
            count = self._lookup_iter(keys, stats)
        return FlowTableRead(keys[:count], stats[:count], _monotonic_ns())

    def _lookup_batch(self, keys: np.ndarray, stats: np.ndarray) -> int | None:
        """Chunked BPF_MAP_LOOKUP_BATCH straight into numpy: ~5x faster than BCC's
        items_lookup_batch, which builds a Python object per entry."""
        from bcc.libbcc import lib

        fd = self.flows.map_fd
        in_batch = ctypes.c_uint32(0)
        out_batch = ctypes.c_uint32(0)
        total = 0
        first = True
        while total < len(keys):
            count = ctypes.c_uint32(min(BATCH_CHUNK, len(keys) - total))
            res = lib.bpf_lookup_batch(
                fd,
                None if first else ctypes.byref(in_batch),
                ctypes.byref(out_batch),
                keys[total:].ctypes.data,
                stats[total:].ctypes.data,
                ctypes.byref(count),
            )
            err = ctypes.get_errno() if res != 0 else 0
            total += count.value
            if res != 0:
                if err == errno.ENOENT:
                    break
                if first and err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524):
                    return None
                raise OSError(err, "BPF_MAP_LOOKUP_BATCH on the flow table")
            first = False
            in_batch.value = out_batch.value
        return total

    def _lookup_iter(self, keys: np.ndarray, stats: np.ndarray) -> int:
        count = 0
        for key, value in self.flows.items():
            if count == len(keys):
                break
            keys[count] = np.frombuffer(bytes(key), FLOW_KEY_DTYPE)[0]
            stats[count] = np.frombuffer(bytes(value), FLOW_STATS_DTYPE)[0]
            count += 1
        return count

    def flows_created(self) -> int:
        key = self.datapath_stats.Key(STAT_FLOWS_CREATED)
        return int(sum(self.datapath_stats[key]))

    def read_ifindex_counters(self) -> dict[int, IfindexCounters]:
        return {
            int(k.value): IfindexCounters(v.non_ip_packets, v.non_ip_bytes, v.dropped_packets, v.dropped_bytes)
            for k, v in self.ifindex_counters.items()
        }

    def read_rule_hits(self) -> dict[int, RuleHits]:
        return {int(k.value): RuleHits(v.packets, v.bytes, v.last_hit_ns) for k, v in self.rule_stats.items()}

    def set_endpoint(self, ifindex: int, slot: int, has_policy: bool) -> None:
        key = self.endpoints.Key(ifindex)
        self.endpoints[key] = self.endpoints.Leaf(slot, ENDPOINT_F_POLICY if has_policy else 0)

    def forget_endpoints(self, keep: Iterable[int]) -> None:
        """Drop endpoint entries of veths that are gone (ifindex values get reused)."""
        keep = set(keep)
        for key in list(self.endpoints.keys()):
            if int(key.value) not in keep:
                with contextlib.suppress(KeyError):
                    del self.endpoints[key]

    def policy_endpoints(self) -> set[int]:
        return {int(k.value) for k, v in self.endpoints.items() if v.flags & ENDPOINT_F_POLICY}

    def sync_policy(self, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Make the trie hold exactly these (key bytes, value bytes) entries.

        New entries are written before stale ones are deleted, so a rule being
        replaced never leaves a gap in which its packets pass."""
        wanted = dict(entries)
        trie = self.policy
        for key, value in wanted.items():
            trie[trie.Key.from_buffer_copy(key)] = trie.Leaf.from_buffer_copy(value)
        for key in list(trie.keys()):
            if bytes(key) not in wanted:
                with contextlib.suppress(KeyError):
                    del trie[key]

    def policy_entry_count(self) -> int:
        return sum(1 for _ in self.policy.keys())


def _monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


# --- tc inspection and removal: needs no loaded program, so cleanup works always ----


def our_filters() -> dict[int, str]:
    """ifindex -> link name for every link carrying our filter on its ingress hook."""
    from pyroute2 import IPRoute

    found: dict[int, str] = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            index = link["index"]
            with contextlib.suppress(Exception):
                for flt in ipr.get_filters(index=index, parent=TC_INGRESS_PARENT):
                    if _is_our_filter(flt):
                        found[index] = link.get_attr("IFLA_IFNAME")
    return found


def _is_our_filter(flt) -> bool:
    options = flt.get_attr("TCA_OPTIONS")
    if options is None:
        return False
    name = options.get_attr("TCA_BPF_NAME") or ""
    return name.startswith(PROGRAM_NAME)


def detach(ifindex: int) -> None:
    """Remove our filter; remove clsact too when nothing else uses it. A veth that
    vanished (container stopped) is already clean, so ENODEV is fine."""
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    gone = (errno.ENODEV, errno.ENOENT, errno.EINVAL)
    with IPRoute() as ipr:
        try:
            ipr.tc("del-filter", "bpf", ifindex, TC_FILTER_HANDLE, parent=TC_INGRESS_PARENT, prio=TC_FILTER_PRIO)
        except NetlinkError as exc:
            if exc.code not in gone:
                raise
        try:
            others = [
                f
                for parent in (TC_INGRESS_PARENT, 0xFFFFFFF3)
                for f in ipr.get_filters(index=ifindex, parent=parent)
                if f.get_attr("TCA_KIND")
            ]
            if not others:
                ipr.tc("del", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code not in gone:
                raise


# --- holders: who has the datapath open ------------------------------------------


@contextlib.contextmanager
def _run_lock() -> Iterator[None]:
    RUN_DIR.mkdir(parents=True, exist_ok=True)
    with open(RUN_DIR / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _live_holders() -> list[int]:
    holders_dir = RUN_DIR / "holders"
    live = []
    for entry in holders_dir.glob("*") if holders_dir.exists() else ():
        pid = int(entry.name)
        if Path(f"/proc/{pid}").exists():
            live.append(pid)
        else:
            entry.unlink(missing_ok=True)  # a holder that died without leaving
    return live


@contextlib.contextmanager
def open_datapath(flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE) -> Iterator[Datapath]:
    """Load (or reuse the pins of) the datapath for the life of the with-block."""
    check_privileges()
    ensure_bpffs()
    holder = RUN_DIR / "holders" / str(os.getpid())
    with _run_lock():
        holder.parent.mkdir(parents=True, exist_ok=True)
        holder.touch()
    datapath = None
    try:
        datapath = Datapath(flow_table_size)
        yield datapath
    finally:
        with _run_lock():
            holder.unlink(missing_ok=True)
            if not _live_holders():
                release_unenforced(datapath)
        if datapath is not None:
            datapath.close()


def release_unenforced(datapath: Datapath | None) -> None:
    """Last one out: keep only what enforces a rule attached; unpin when no rule is left."""
    enforced = datapath.policy_endpoints() if datapath is not None else set()
    for ifindex in our_filters():
        if ifindex not in enforced:
            detach(ifindex)
    if datapath is None or (not enforced and datapath.policy_entry_count() == 0):
        remove_pins()


def remove_pins() -> None:
    if PIN_DIR.parent.exists():
        shutil.rmtree(PIN_DIR.parent, ignore_errors=True)


def cleanup_everything() -> list[str]:
    """egress-agent cleanup: every attachment, pin and map of ours, whatever holds them."""
    removed = []
    with _run_lock():
        for ifindex, name in our_filters().items():
            detach(ifindex)
            removed.append(f"filter on {name}")
        if PIN_DIR.parent.exists():
            removed.append(f"pins under {PIN_DIR.parent}")
        remove_pins()
    return removed
