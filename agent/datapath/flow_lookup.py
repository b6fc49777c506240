"""Many flow-table lookups in one syscall: a small BPF_PROG_TYPE_SYSCALL program, run by
BPF_PROG_TEST_RUN, between two mmapped arrays.

Each interval the agent looks up the ~1,000 flows that moved (Maps.lookup_flows). One
BPF_MAP_LOOKUP_ELEM per key cost 2.8 us each here, nearly all of it syscall entry and
exit. Instead, user space writes the keys straight into a mmapped array (no syscall), one
BPF_PROG_TEST_RUN runs a program that looks each of them up in the flow table and copies
what it finds, with a found flag, into a second mmapped array, read in place (1,000 of
100,000 flows, cold caches: 2.8 -> 0.8 ms).

The program is assembled here rather than compiled from bpf/egress.c: it needs nothing
but the fds of three maps this process holds, so it is the same whether the datapath came
from BCC or from the program cache, and it compiles and pins nothing (it lives as long as
this process). The kernel runs syscall programs only as sleepable (BPF_F_SLEEPABLE), which
BCC's loader cannot ask for. Loading it takes ~0.5 ms.

A kernel without bpf_loop (before 5.17), syscall programs (5.14) or mmapable arrays (5.5)
makes load() return None: the caller then looks keys up one syscall each.

Unlike a lookup by syscall, a lookup from a program marks the LRU entry referenced; every
key asked for has just moved, so the datapath marked it anyway.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import struct

import numpy as np

from agent.datapath.cached_load import (
    BPF_MAP_CREATE,
    BPF_PROG_LOAD,
    INSTRUCTION_BYTES,
    MapCreateAttr,
    ProgLoadAttr,
)
from agent.datapath.layouts import joined, put, take
from agent.datapath.syscalls import BPF_PROG_TEST_RUN, TestRunAttr, address, sys_bpf

log = logging.getLogger(__name__)

# Keys per run: 1,024 holds the 1,000 flows a second of issue 11's load moves.
LOOKUP_SLOTS = 1024
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_SYSCALL = 31
BPF_F_MMAPABLE = 1 << 10
BPF_F_SLEEPABLE = 1 << 4
BPF_FUNC_MAP_LOOKUP_ELEM = 1
BPF_FUNC_LOOP = 181
BPF_BTF_LOAD = 18
BTF_MAGIC = 0xEB9F
BTF_KIND_INT, BTF_KIND_FUNC, BTF_KIND_FUNC_PROTO = 1, 12, 13
_BTF_HEADER = struct.Struct("<HBBIIIII")  # struct btf_header
_BTF_TYPE = struct.Struct("<III")  # struct btf_type: name_off, info (kind << 24 | vlen), size or type
VERIFIER_LOG_BYTES = 1 << 20


class ProgLoadWithBtfAttr(ctypes.Structure):
    """union bpf_attr, the BPF_PROG_LOAD member on to func_info_cnt."""

    _fields_ = [
        *ProgLoadAttr._fields_,
        ("prog_ifindex", ctypes.c_uint32),
        ("expected_attach_type", ctypes.c_uint32),
        ("prog_btf_fd", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("func_info_cnt", ctypes.c_uint32),
    ]


class BtfLoadAttr(ctypes.Structure):
    """union bpf_attr, the BPF_BTF_LOAD member."""

    _fields_ = [
        ("btf", ctypes.c_uint64),
        ("btf_log_buf", ctypes.c_uint64),
        ("btf_size", ctypes.c_uint32),
        ("btf_log_size", ctypes.c_uint32),
        ("btf_log_level", ctypes.c_uint32),
    ]


# --- struct bpf_insn: code, dst | src << 4, s16 off, s32 imm ----------------------------
_INSN = struct.Struct("<BBhi")
R0, R1, R2, R3, R4, R6, R8, R9 = 0, 1, 2, 3, 4, 6, 8, 9
LDX_W, LDX_DW, STX_DW, ST_B = 0x61, 0x79, 0x7B, 0x72
MOV_K, MOV_X, ADD_K, ADD_X, MUL_K = 0xB7, 0xBF, 0x07, 0x0F, 0x27
JEQ_K, JLT_K, JLE_K, CALL, EXIT = 0x15, 0xA5, 0xB5, 0x85, 0x95
LD_IMM64, PSEUDO_MAP_FD, PSEUDO_MAP_VALUE, PSEUDO_FUNC = 0x18, 1, 2, 4


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return _INSN.pack(code, dst | src << 4, off, imm)


def load_map(dst: int, fd: int) -> bytes:
    """dst = the map (a helper's map argument): a two-slot BPF_LD_IMM64."""
    return insn(LD_IMM64, dst, PSEUDO_MAP_FD, imm=fd) + insn(0)


def load_map_value(dst: int, fd: int) -> bytes:
    """dst = the address of the value of a one-element array (offset 0)."""
    return insn(LD_IMM64, dst, PSEUDO_MAP_VALUE, imm=fd) + insn(0)


def lookup_program(
    flows_fd: int, keys_fd: int, results_fd: int, key_size: int, value_size: int
) -> tuple[bytes, int]:
    """bpf_loop(min(ctx->count, LOOKUP_SLOTS), look_up_key): for each i,
           value = lookup(flows, &keys[i]); found[i] = value != NULL; if value: values[i] = *value
    keys_fd's one value is LOOKUP_SLOTS keys; results_fd's is found[LOOKUP_SLOTS] bytes, then
    LOOKUP_SLOTS values. By bpf_loop (5.17) rather than a loop of our own: the verifier
    walks a bounded loop once per possible iteration (65 ms of CPU at 1,024 slots), a
    bpf_loop callback once. Returns the instructions and where look_up_key starts. A jump's
    offset counts the instructions after it."""
    copy_value = b"".join(
        insn(LDX_DW, R4, R0, off) + insn(STX_DW, R3, R4, off) for off in range(0, value_size, 8)
    )
    store_value = (
        insn(ST_B, R8, imm=1)  # found[i] = 1
        + insn(MOV_X, R3, R6)
        + insn(MUL_K, R3, imm=value_size)
        + insn(ADD_X, R3, R9)
        + insn(ADD_K, R3, imm=LOOKUP_SLOTS)  # r3 = &values[i]
        + copy_value
    )
    # long look_up_key(u64 i, void *unused): r6 i, r8 &found[i], r9 the results value
    look_up_key = (
        insn(JLT_K, R1, off=2, imm=LOOKUP_SLOTS)  # i < LOOKUP_SLOTS, as bpf_loop keeps it:
        + insn(MOV_K, R0, imm=1)  # else stop (bounds i for the verifier)
        + insn(EXIT)
        + insn(MOV_X, R6, R1)
        + load_map_value(R2, keys_fd)
        + insn(MOV_X, R3, R6)
        + insn(MUL_K, R3, imm=key_size)
        + insn(ADD_X, R2, R3)  # r2 = &keys[i]
        + load_map(R1, flows_fd)
        + insn(CALL, imm=BPF_FUNC_MAP_LOOKUP_ELEM)  # r0 = the flow's value, or NULL
        + load_map_value(R9, results_fd)
        + insn(MOV_X, R8, R9)
        + insn(ADD_X, R8, R6)  # r8 = &found[i]
        + insn(ST_B, R8, imm=0)
        + insn(JEQ_K, R0, off=len(store_value) // INSTRUCTION_BYTES, imm=0)  # not found: found[i] stays 0
        + store_value
        + insn(MOV_K, R0, imm=0)  # go on
        + insn(EXIT)
    )
    main = [
        insn(LDX_W, R1, R1, 0),  # r1 = ctx->count
        insn(JLE_K, R1, off=1, imm=LOOKUP_SLOTS),
        insn(MOV_K, R1, imm=LOOKUP_SLOTS),  # at most LOOKUP_SLOTS
        b"",  # r2 = look_up_key: its offset is known once the rest is
        insn(MOV_K, R3, imm=0),  # no callback context
        insn(MOV_K, R4, imm=0),  # flags
        insn(CALL, imm=BPF_FUNC_LOOP),
        insn(MOV_K, R0, imm=0),
        insn(EXIT),
    ]
    # a BPF_PSEUDO_FUNC load's imm: where the subprogram starts, from the load's second slot
    second_slot = sum(len(part) for part in main[:3]) // INSTRUCTION_BYTES + 1
    main_length = sum(len(part) for part in main) // INSTRUCTION_BYTES + 2
    main[3] = insn(LD_IMM64, R2, PSEUDO_FUNC, imm=main_length - second_slot) + insn(0)
    return b"".join(main) + look_up_key, main_length


def _array_of_one(value_size: int) -> int:
    attr = MapCreateAttr(
        map_type=BPF_MAP_TYPE_ARRAY,
        key_size=4,
        value_size=value_size,
        max_entries=1,
        map_flags=BPF_F_MMAPABLE,
    )
    return sys_bpf(BPF_MAP_CREATE, attr)


def _mapped(fd: int, size: int, writable: bool) -> mmap.mmap:
    pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE
    protection = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
    return mmap.mmap(fd, pages, mmap.MAP_SHARED, protection)


def _functions_btf(names: list[str]) -> int:
    """A BTF object (BPF_BTF_LOAD) of static functions `int name(void)`, type ids 3, 4...:
    the verifier takes a subprogram's address (bpf_loop's callback) only with func_info."""
    strings = b"\0int\0" + b"".join(name.encode() + b"\0" for name in names)
    types = _BTF_TYPE.pack(1, BTF_KIND_INT << 24, 4) + struct.pack("<I", 1 << 24 | 32)  # 1: int
    types += _BTF_TYPE.pack(0, BTF_KIND_FUNC_PROTO << 24, 1)  # 2: int (void)
    name_at = 5
    for name in names:
        types += _BTF_TYPE.pack(name_at, BTF_KIND_FUNC << 24, 2)
        name_at += len(name) + 1
    header = _BTF_HEADER.pack(BTF_MAGIC, 1, 0, _BTF_HEADER.size, 0, len(types), len(types), len(strings))
    blob = ctypes.create_string_buffer(header + types + strings)
    return sys_bpf(BPF_BTF_LOAD, BtfLoadAttr(btf=address(blob), btf_size=len(blob) - 1))


def _load(code: bytes, callback_start: int) -> int:
    """The program's fd; without a verifier log first (writing it costs several times the
    verification), then again with one to say why it was refused."""
    text = ctypes.create_string_buffer(code, len(code))
    license_text = ctypes.create_string_buffer(b"GPL")
    btf_fd = _functions_btf(["look_up_flows", "look_up_key"])
    func_info = (ctypes.c_uint32 * 4)(0, 3, callback_start, 4)  # struct bpf_func_info: insn_off, type_id
    attr = ProgLoadWithBtfAttr(
        prog_type=BPF_PROG_TYPE_SYSCALL,
        insn_cnt=len(code) // INSTRUCTION_BYTES,
        insns=address(text),
        license=address(license_text),
        prog_flags=BPF_F_SLEEPABLE,
        prog_name=b"flow_lookup",
        prog_btf_fd=btf_fd,
        func_info_rec_size=8,
        func_info=address(func_info),
        func_info_cnt=2,
    )
    try:
        return sys_bpf(BPF_PROG_LOAD, attr)
    except OSError:
        verifier_log = ctypes.create_string_buffer(VERIFIER_LOG_BYTES)
        attr.log_level, attr.log_size, attr.log_buf = 1, len(verifier_log), address(verifier_log)
        try:
            return sys_bpf(BPF_PROG_LOAD, attr)
        except OSError as exc:
            tail = verifier_log.value.decode(errors="replace").strip().splitlines()[-3:]
            raise OSError(exc.errno, f"{exc.strerror}: {' / '.join(tail)}") from None
    finally:
        os.close(btf_fd)  # the program holds it


class FlowLookup:
    """The loaded program, its two arrays and their mappings (112 KB, this process's alone).
    One caller at a time: every lookup goes through the same two arrays."""

    def __init__(self, flows_fd: int, key_dtype: np.dtype, value_dtype: np.dtype):  # type: ignore[type-arg]
        self._fds: list[int] = []
        try:
            keys_fd = self._own(_array_of_one(LOOKUP_SLOTS * key_dtype.itemsize))
            results_size = LOOKUP_SLOTS + LOOKUP_SLOTS * value_dtype.itemsize
            results_fd = self._own(_array_of_one(results_size))
            code, callback_start = lookup_program(
                flows_fd, keys_fd, results_fd, key_dtype.itemsize, value_dtype.itemsize
            )
            self._program_fd = self._own(_load(code, callback_start))
            self._keys_memory = _mapped(keys_fd, LOOKUP_SLOTS * key_dtype.itemsize, writable=True)
            self._results_memory = _mapped(results_fd, results_size, writable=False)
        except BaseException:
            self._close_fds()
            raise
        self._keys = np.frombuffer(self._keys_memory, key_dtype, LOOKUP_SLOTS)
        self._found = np.frombuffer(self._results_memory, np.bool_, LOOKUP_SLOTS)
        self._values = np.frombuffer(self._results_memory, value_dtype, LOOKUP_SLOTS, offset=LOOKUP_SLOTS)
        self._count = ctypes.c_uint32()
        self._run = TestRunAttr(
            prog_fd=self._program_fd, ctx_size_in=ctypes.sizeof(self._count), ctx_in=address(self._count)
        )

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _close_fds(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()

    def lookup(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(found, values): which of these keys the table holds, and their values in the
        keys' order. One run per LOOKUP_SLOTS keys."""
        found = np.empty(len(wanted), np.bool_)
        values: list[np.ndarray] = []
        for start in range(0, len(wanted), LOOKUP_SLOTS):
            count = min(LOOKUP_SLOTS, len(wanted) - start)
            put(self._keys[:count], wanted[start : start + count])
            self._count.value = count
            sys_bpf(BPF_PROG_TEST_RUN, self._run)
            found[start : start + count] = self._found[:count]
            values.append(take(self._values[:count], found[start : start + count]))  # a copy
        return found, joined([self._values[:0], *values])

    def close(self) -> None:
        del self._keys, self._found, self._values  # no mapping closes while a view of it lives
        self._keys_memory.close()
        self._results_memory.close()
        self._close_fds()


def load(flows_fd: int, key_dtype: np.dtype, value_dtype: np.dtype) -> FlowLookup | None:  # type: ignore[type-arg]
    """The lookup program for this flow table, or None when this kernel cannot run it."""
    try:
        return FlowLookup(flows_fd, key_dtype, value_dtype)
    except OSError as exc:
        log.warning(
            "moved flows are looked up one syscall each: the kernel refused the lookup program (%s)", exc
        )
        return None
