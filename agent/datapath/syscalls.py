"""Raw bpf(2): the few commands we need, by syscall number, with no BCC and no libbpf.

The bpf syscall has a different number on each architecture, and libc has no
wrapper for it, so we call syscall(2) with the number from the kernel's unistd
tables for the machine we run on.
"""

from __future__ import annotations

import ctypes
import os
import platform
from pathlib import Path

from agent.errors import EXIT_KERNEL, UserError

# __NR_bpf in the kernel's tables (arch/*/syscall*.tbl, asm-generic/unistd.h).
BPF_SYSCALL_NUMBERS = {
    "x86_64": 321,
    "aarch64": 280,  # asm-generic
    "arm64": 280,
    "riscv64": 280,  # asm-generic
    "loongarch64": 280,  # asm-generic
    "armv7l": 386,
    "armv6l": 386,
    "i686": 357,
    "i386": 357,
    "ppc64le": 361,
    "ppc64": 361,
    "s390x": 351,
}

BPF_MAP_LOOKUP_ELEM = 1
BPF_MAP_UPDATE_ELEM = 2
BPF_MAP_DELETE_ELEM = 3
BPF_MAP_GET_NEXT_KEY = 4
BPF_OBJ_PIN = 6
BPF_OBJ_GET = 7
BPF_PROG_TEST_RUN = 10
BPF_MAP_LOOKUP_BATCH = 24

_libc = ctypes.CDLL(None, use_errno=True)
_syscall_without_errno = ctypes.CDLL(None).syscall


def bpf_syscall_number(machine: str | None = None) -> int:
    machine = machine or platform.machine()
    number = BPF_SYSCALL_NUMBERS.get(machine)
    if number is None:
        raise UserError(
            f"unsupported architecture {machine!r}: egress-top knows the bpf syscall number for "
            f"{', '.join(sorted(BPF_SYSCALL_NUMBERS))}",
            EXIT_KERNEL,
        )
    return number


class MapElemAttr(ctypes.Structure):
    _fields_ = [
        ("map_fd", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("key", ctypes.c_uint64),
        ("value", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class ObjAttr(ctypes.Structure):
    """BPF_OBJ_PIN and BPF_OBJ_GET."""

    _fields_ = [("pathname", ctypes.c_uint64), ("bpf_fd", ctypes.c_uint32), ("file_flags", ctypes.c_uint32)]


class BatchAttr(ctypes.Structure):
    """BPF_MAP_*_BATCH (union bpf_attr's `batch` member)."""

    _fields_ = [
        ("in_batch", ctypes.c_uint64),
        ("out_batch", ctypes.c_uint64),
        ("keys", ctypes.c_uint64),
        ("values", ctypes.c_uint64),
        ("count", ctypes.c_uint32),
        ("map_fd", ctypes.c_uint32),
        ("elem_flags", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
    ]


class TestRunAttr(ctypes.Structure):
    """union bpf_attr, the BPF_PROG_TEST_RUN member (include/uapi/linux/bpf.h)."""

    _fields_ = [
        ("prog_fd", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("data_in", ctypes.c_uint64),
        ("data_out", ctypes.c_uint64),
        ("repeat", ctypes.c_uint32),
        ("duration", ctypes.c_uint32),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_uint64),
        ("ctx_out", ctypes.c_uint64),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


def sys_bpf(cmd: int, attr: ctypes.Structure) -> int:
    result = _libc.syscall(bpf_syscall_number(), cmd, ctypes.byref(attr), ctypes.sizeof(attr))
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


def bpf_each(cmd: int, attrs: ctypes.Array[ctypes.c_char], size: int) -> list[int]:
    """bpf(cmd, attr) for each `size`-byte attr laid end to end in `attrs`:
    each call's result, negative when it failed. The errno is not kept (the caller asks again
    with sys_bpf for the few that fail): at a lookup per moved flow, copying errno after each
    call and setting an attr's fields between calls made the Python side of a lookup cost as
    much as the syscall (1,000 lookups on a private 100,000-flow table: 2.8 -> 1.7 ms)."""
    call, number, at = _syscall_without_errno, bpf_syscall_number(), ctypes.byref
    return [call(number, cmd, at(attrs, offset), size) for offset in range(0, len(attrs) - size + 1, size)]


def address(buffer: ctypes.Array) -> int:  # type: ignore[type-arg]
    return ctypes.addressof(buffer)


def fd_info(fd: int) -> dict[str, str]:
    """What the kernel says of a bpf fd of ours in /proc/self/fdinfo (map_type, key_size,
    map_id, prog_tag, ...), field name to text."""
    lines = Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def obj_get(path: Path) -> int:
    """An fd on a pinned map or program."""
    raw_path = ctypes.create_string_buffer(os.fsencode(path))
    return sys_bpf(BPF_OBJ_GET, ObjAttr(address(raw_path), 0, 0))


def obj_pin(fd: int, path: Path) -> None:
    raw_path = ctypes.create_string_buffer(os.fsencode(path))
    sys_bpf(BPF_OBJ_PIN, ObjAttr(address(raw_path), fd, 0))
