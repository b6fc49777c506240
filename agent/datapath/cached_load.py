"""Load a compiled program from the cache with raw bpf(2): no BCC, no clang, no child.

The maps come first: a pinned map that is already there is reused when its attributes
are the ones the program was verified against (another process may be reading it),
otherwise it is created and pinned under the same name BCC would pin it; a private map
is created for this program alone. Each relocation's BPF_LD_IMM64 gets its map's fd,
then BPF_PROG_LOAD as SCHED_CLS. Anything unexpected returns None and the caller
compiles with BCC instead, as before the cache existed.
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from pathlib import Path

from agent.datapath.program_cache import CompiledProgram, MapSpec
from agent.datapath.syscalls import address, fd_info, obj_get, obj_pin, sys_bpf

log = logging.getLogger(__name__)

BPF_MAP_CREATE = 0
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SCHED_CLS = 3
BPF_LD_IMM64 = 0x18
BPF_PSEUDO_MAP_FD = 1
BPF_OBJ_NAME_LEN = 16
INSTRUCTION_BYTES = 8


class MapCreateAttr(ctypes.Structure):
    """union bpf_attr, the BPF_MAP_CREATE member up to map_name (the kernel zeroes the rest)."""

    _fields_ = [
        ("map_type", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("inner_map_fd", ctypes.c_uint32),
        ("numa_node", ctypes.c_uint32),
        ("map_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


class ProgLoadAttr(ctypes.Structure):
    """union bpf_attr, the BPF_PROG_LOAD member up to prog_name."""

    _fields_ = [
        ("prog_type", ctypes.c_uint32),
        ("insn_cnt", ctypes.c_uint32),
        ("insns", ctypes.c_uint64),
        ("license", ctypes.c_uint64),
        ("log_level", ctypes.c_uint32),
        ("log_size", ctypes.c_uint32),
        ("log_buf", ctypes.c_uint64),
        ("kern_version", ctypes.c_uint32),
        ("prog_flags", ctypes.c_uint32),
        ("prog_name", ctypes.c_char * BPF_OBJ_NAME_LEN),
    ]


def map_spec(fd: int, name: str, pinned: bool) -> MapSpec:
    """A loaded map's create attributes, from /proc/self/fdinfo."""
    info = fd_info(fd)
    return MapSpec(
        name=name,
        pinned=pinned,
        map_type=int(info["map_type"]),
        key_size=int(info["key_size"]),
        value_size=int(info["value_size"]),
        max_entries=int(info["max_entries"]),
        map_flags=int(info["map_flags"], 16),
    )


def map_id(fd: int) -> int:
    return int(fd_info(fd)["map_id"])


def relocations_of(instructions: bytes) -> list[tuple[int, int]]:
    """(instruction index, map fd) of every BPF_LD_IMM64 that loads a map by fd."""
    found = []
    for index in range(len(instructions) // INSTRUCTION_BYTES):
        code, registers, _, imm = struct.unpack_from("<BBhi", instructions, index * INSTRUCTION_BYTES)
        if code == BPF_LD_IMM64 and registers >> 4 == BPF_PSEUDO_MAP_FD:
            found.append((index, imm))
    return found


def with_map_fds(instructions: bytes, fds: dict[int, int]) -> bytes:
    """The instructions with fds[index] in the imm of each relocated BPF_LD_IMM64."""
    patched = bytearray(instructions)
    for index, fd in fds.items():
        code, registers = struct.unpack_from("<BB", patched, index * INSTRUCTION_BYTES)
        if code != BPF_LD_IMM64 or registers >> 4 != BPF_PSEUDO_MAP_FD:
            raise ValueError(f"instruction {index} does not load a map")
        struct.pack_into("<i", patched, index * INSTRUCTION_BYTES + 4, fd)
    return bytes(patched)


def _open_or_create(spec: MapSpec, pin_dir: Path) -> int:
    pin = pin_dir / spec.name
    if spec.pinned and pin.exists():
        fd = obj_get(pin)
        if map_spec(fd, spec.name, pinned=True) != spec:
            os.close(fd)
            raise ValueError(f"the pinned map {pin} differs from the one the program was built for")
        return fd
    attr = MapCreateAttr(
        spec.map_type,
        spec.key_size,
        spec.value_size,
        spec.max_entries,
        spec.map_flags,
        0,
        0,
        spec.name.encode()[: BPF_OBJ_NAME_LEN - 1],
    )
    fd = sys_bpf(BPF_MAP_CREATE, attr)
    if spec.pinned:
        try:
            obj_pin(fd, pin)
        except OSError:
            os.close(fd)
            raise
    return fd


def load_compiled(program: CompiledProgram, pin_dir: Path) -> int | None:
    """The loaded program's fd, its maps opened or created and pinned; None on any failure."""
    map_fds: dict[str, int] = {}
    try:
        for spec in program.maps:
            map_fds[spec.name] = _open_or_create(spec, pin_dir)
        instructions = with_map_fds(
            program.instructions, {index: map_fds[name] for index, name in program.relocations}
        )
        code = ctypes.create_string_buffer(instructions, len(instructions))
        license_text = ctypes.create_string_buffer(program.license.encode())
        attr = ProgLoadAttr(
            prog_type=BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt=len(instructions) // INSTRUCTION_BYTES,
            insns=address(code),
            license=address(license_text),
            prog_name=program.name.encode()[: BPF_OBJ_NAME_LEN - 1],
        )
        return sys_bpf(BPF_PROG_LOAD, attr)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("the cached program did not load (%s): compiling it again", exc)
        return None
    finally:
        for fd in map_fds.values():
            os.close(fd)  # the program (and the pins) hold the maps now
