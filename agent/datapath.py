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
import functools
import importlib.resources
import logging
import os
import shutil
import struct
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
    monotonic_ns: int  # when the read ended
    started_ns: int  # when it began: a flow counted during the read may or may not be in it


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
        raise UserError("needs root (CAP_BPF and CAP_NET_ADMIN): run it with sudo", EXIT_PERMISSION)


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
        mounted = (
            subprocess.run(["mount", "-t", "bpf", "bpf", str(BPFFS)], capture_output=True).returncode == 0
        )
    except OSError:
        mounted = False
    if not mounted or not os.path.ismount(BPFFS):
        raise UserError(
            f"cannot mount bpffs at {BPFFS}: run 'mount -t bpf bpf {BPFFS}' "
            "(the kernel needs CONFIG_BPF_SYSCALL)",
            EXIT_KERNEL,
        )


_SYS_BPF = 321  # x86_64
_BPF_MAP_LOOKUP_ELEM, _BPF_MAP_UPDATE_ELEM, _BPF_MAP_DELETE_ELEM, _BPF_MAP_GET_NEXT_KEY = 1, 2, 3, 4
_BPF_OBJ_GET = 7
_libc = ctypes.CDLL(None, use_errno=True)


class _MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class _ObjGetAttr(ctypes.Structure):
    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


def _sys_bpf(cmd: int, attr: ctypes.Structure) -> int:
    result = _libc.syscall(_SYS_BPF, cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return result


def _address(buffer: ctypes.Array) -> int:  # type: ignore[type-arg]
    return ctypes.addressof(buffer)


class PinnedMap:
    """A pinned BPF map, by raw syscalls on bytes: no BCC, no compile, works from any process."""

    def __init__(self, path: Path):
        raw_path = ctypes.create_string_buffer(os.fsencode(path))
        self.fd = _sys_bpf(_BPF_OBJ_GET, _ObjGetAttr(_address(raw_path), 0, 0))
        info = dict(
            line.split(":\t", 1)
            for line in Path(f"/proc/self/fdinfo/{self.fd}").read_text().splitlines()
            if ":\t" in line
        )
        self.key_size = int(info["key_size"])
        self.value_size = int(info["value_size"])
        self.max_entries = int(info["max_entries"])
        percpu_types = {5, 6, 10}  # percpu hash, percpu array, lru percpu hash
        self.percpu = int(info["map_type"]) in percpu_types
        # a per-CPU value is one 8-byte-aligned slot per possible CPU
        self._read_size = (
            ((self.value_size + 7) // 8 * 8) * _possible_cpus() if self.percpu else self.value_size
        )

    def close(self) -> None:
        os.close(self.fd)

    def _elem(self, cmd: int, key: bytes, value: ctypes.Array | None = None, flags: int = 0) -> None:  # type: ignore[type-arg]
        key_buffer = ctypes.create_string_buffer(key, self.key_size)
        attr = _MapElemAttr(
            self.fd, 0, _address(key_buffer), _address(value) if value is not None else 0, flags
        )
        _sys_bpf(cmd, attr)

    def lookup(self, key: bytes) -> bytes | None:
        value = ctypes.create_string_buffer(self._read_size)
        try:
            self._elem(_BPF_MAP_LOOKUP_ELEM, key, value)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise
        return value.raw

    def update(self, key: bytes, value: bytes) -> None:
        self._elem(_BPF_MAP_UPDATE_ELEM, key, ctypes.create_string_buffer(value, self.value_size))

    def delete(self, key: bytes) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._elem(_BPF_MAP_DELETE_ELEM, key)

    def list_keys(self) -> list[bytes]:
        keys: list[bytes] = []
        current = ctypes.create_string_buffer(self.key_size)
        following = ctypes.create_string_buffer(self.key_size)
        attr = _MapElemAttr(self.fd, 0, 0, _address(following), 0)  # key 0: start from the first
        while len(keys) <= self.max_entries:
            try:
                _sys_bpf(_BPF_MAP_GET_NEXT_KEY, attr)
            except OSError as exc:
                if exc.errno == errno.ENOENT:
                    break
                raise
            keys.append(following.raw)
            ctypes.memmove(current, following, self.key_size)
            attr.key = _address(current)
        return keys

    def items(self) -> list[tuple[bytes, bytes]]:
        found = ((key, self.lookup(key)) for key in self.list_keys())
        return [(key, value) for key, value in found if value is not None]


@functools.cache
def _possible_cpus() -> int:
    # "0-3" or "0,2-5": the kernel sizes per-CPU values by possible, not online, CPUs
    total = 0
    for part in Path("/sys/devices/system/cpu/possible").read_text().strip().split(","):
        low, _, high = part.partition("-")
        total += int(high or low) - int(low) + 1
    return total


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


_ENDPOINT = struct.Struct("=II")  # struct endpoint_info
_IFINDEX = struct.Struct("=I")
_IFINDEX_COUNTERS = struct.Struct("=4Q")  # struct ifindex_counters
_RULE_STATS = struct.Struct("=3Q")  # struct rule_stats


def pins_exist(pin_dir: Path = PIN_DIR) -> bool:
    return all((pin_dir / name).exists() for name in MAP_PINS)


class Maps:
    """Every pinned map of ours, read and written as bytes laid out as in bpf/egress_maps.h."""

    def __init__(self, pin_dir: Path = PIN_DIR):
        self.pin_dir = pin_dir
        self.flows = PinnedMap(pin_dir / "flows")
        self.endpoints = PinnedMap(pin_dir / "endpoints")
        self.policy = PinnedMap(pin_dir / "policy_lpm")
        self.rule_stats = PinnedMap(pin_dir / "rule_stats")
        self.ifindex_counters = PinnedMap(pin_dir / "ifindex_counters")
        self.datapath_stats = PinnedMap(pin_dir / "datapath_stats")
        self.flow_table_size = self.flows.max_entries
        self._batch_supported = True

    def close(self) -> None:
        for pinned in (
            self.flows,
            self.endpoints,
            self.policy,
            self.rule_stats,
            self.ifindex_counters,
            self.datapath_stats,
        ):
            pinned.close()

    def read_flows(self) -> FlowTableRead:
        started = _monotonic_ns()
        keys = np.empty(self.flow_table_size, FLOW_KEY_DTYPE)
        stats = np.empty(self.flow_table_size, FLOW_STATS_DTYPE)
        count = self._lookup_batch(keys, stats) if self._batch_supported else None
        if count is None:
            self._batch_supported = False
            count = self._lookup_one_by_one(keys, stats)
        return FlowTableRead(keys[:count], stats[:count], _monotonic_ns(), started)

    def _lookup_batch(self, keys: np.ndarray, stats: np.ndarray) -> int | None:
        """Chunked BPF_MAP_LOOKUP_BATCH straight into numpy: ~5x faster than BCC's
        items_lookup_batch, which builds a Python object per entry."""
        from bcc.libbcc import lib

        in_batch = ctypes.c_uint32(0)
        out_batch = ctypes.c_uint32(0)
        total = 0
        first = True
        while total < len(keys):
            count = ctypes.c_uint32(min(BATCH_CHUNK, len(keys) - total))
            res = lib.bpf_lookup_batch(
                self.flows.fd,
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

    def _lookup_one_by_one(self, keys: np.ndarray, stats: np.ndarray) -> int:
        """For kernels without batch lookups (before 5.6)."""
        items = self.flows.items()[: len(keys)]
        for row, (key, value) in enumerate(items):
            keys[row] = np.frombuffer(key, FLOW_KEY_DTYPE)[0]
            stats[row] = np.frombuffer(value, FLOW_STATS_DTYPE)[0]
        return len(items)

    def flows_created(self) -> int:
        per_cpu = self.datapath_stats.lookup(_IFINDEX.pack(STAT_FLOWS_CREATED)) or b""
        return sum(struct.unpack(f"={len(per_cpu) // 8}Q", per_cpu))

    def read_ifindex_counters(self) -> dict[int, IfindexCounters]:
        return {
            _IFINDEX.unpack(key)[0]: IfindexCounters(*_IFINDEX_COUNTERS.unpack(value))
            for key, value in self.ifindex_counters.items()
        }

    def read_rule_hits(self) -> dict[int, RuleHits]:
        return {
            _IFINDEX.unpack(key)[0]: RuleHits(*_RULE_STATS.unpack(value))
            for key, value in self.rule_stats.items()
        }

    def set_endpoint(self, ifindex: int, slot: int, has_policy: bool) -> None:
        self.endpoints.update(
            _IFINDEX.pack(ifindex), _ENDPOINT.pack(slot, ENDPOINT_F_POLICY if has_policy else 0)
        )

    def forget_endpoints(self, keep: Iterable[int]) -> None:
        """Drop endpoint entries of veths that are gone (ifindex values get reused)."""
        keep = set(keep)
        for key in self.endpoints.list_keys():
            if _IFINDEX.unpack(key)[0] not in keep:
                self.endpoints.delete(key)

    def policy_endpoints(self) -> set[int]:
        return {
            _IFINDEX.unpack(key)[0]
            for key, value in self.endpoints.items()
            if _ENDPOINT.unpack(value)[1] & ENDPOINT_F_POLICY
        }

    def sync_policy(self, entries: Iterable[tuple[bytes, bytes]]) -> None:
        """Make the trie hold exactly these (key bytes, value bytes) entries.

        New entries are written before stale ones are deleted, so a rule being
        replaced never leaves a gap in which its packets pass."""
        wanted = dict(entries)
        for key, value in wanted.items():
            self.policy.update(key, value)
        for key in self.policy.list_keys():
            if key not in wanted:
                self.policy.delete(key)

    def policy_entry_count(self) -> int:
        return len(self.policy.list_keys())


class Datapath(Maps):
    """The program, loaded by BCC, plus its pinned maps. Use open_datapath() to get one."""

    def __init__(self, flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE, pin_dir: Path = PIN_DIR):
        self._bpf, self._fn = self._load(flow_table_size, pin_dir)
        super().__init__(pin_dir)

    @staticmethod
    def _load(flow_table_size: int, pin_dir: Path):  # -> (bcc.BPF, bcc function)
        ensure_kernel_headers()
        pin_dir.mkdir(parents=True, exist_ok=True)
        _drop_mismatched_flow_pin(pin_dir, flow_table_size)
        from bcc import BPF  # imported late: costs ~70 MB and needs root

        source = Path(str(importlib.resources.files("agent.bpf") / "egress.c"))
        cflags = [
            f"-I{source.parent}",
            f"-DFLOW_TABLE_SIZE={flow_table_size}",
            f"-DPOLICY_TABLE_SIZE={POLICY_TABLE_SIZE}",
            *(f'-D{macro}="{pin_dir / name}"' for name, macro in MAP_PINS.items()),
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
                    f"the kernel refused the BPF program ({reason.strip()}): "
                    "run with --verbose for the full log",
                    EXIT_KERNEL,
                    detail="\n".join(lines[-40:]),
                ) from None
        return bpf, fn

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
        super().close()
        self._bpf.cleanup()


def _drop_mismatched_flow_pin(pin_dir: Path, flow_table_size: int) -> None:
    """A pinned flow map of another size would be reused silently: replace it."""
    path = pin_dir / "flows"
    if not path.exists():
        return
    pinned = PinnedMap(path)
    size = pinned.max_entries
    pinned.close()
    if size != flow_table_size:
        log.warning(
            "flow table was pinned with %d entries, now %d: starting a new flow table", size, flow_table_size
        )
        path.unlink()


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
            ipr.tc(
                "del-filter", "bpf", ifindex, TC_FILTER_HANDLE, parent=TC_INGRESS_PARENT, prio=TC_FILTER_PRIO
            )
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
def exclusive() -> Iterator[None]:
    """Serialises attach/detach, policy syncs and holder changes across our processes:
    two writers syncing the trie from different store versions would undo each other."""
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


def open_pinned_maps() -> Maps | None:
    """The maps a running (or departed) datapath left pinned, without compiling anything."""
    try:
        return Maps() if pins_exist() else None
    except OSError as exc:
        log.debug("pinned maps unusable: %s", exc)
        return None


@contextlib.contextmanager
def open_datapath(flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE) -> Iterator[Datapath]:
    """Load (or reuse the pins of) the datapath for the life of the with-block."""
    check_privileges()
    ensure_bpffs()
    holder = RUN_DIR / "holders" / str(os.getpid())
    datapath = None
    try:
        with exclusive():
            holder.parent.mkdir(parents=True, exist_ok=True)
            holder.touch()
            # Under the lock: two first loads at once would both try to create the pins.
            datapath = Datapath(flow_table_size)
        yield datapath
    finally:
        with exclusive():
            holder.unlink(missing_ok=True)
        release_if_unheld(datapath)
        if datapath is not None:
            datapath.close()


def release_if_unheld(maps: Maps | None) -> None:
    """Last one out turns off the lights: with no process holding the datapath, keep
    attached only the veths that enforce a rule, and unpin when no rule is left."""
    with exclusive():
        if _live_holders():
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
