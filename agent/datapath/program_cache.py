"""The compiled program on disk: what loads it again without BCC, keyed by what built it.

A BCC compile costs ~1 s and ~165 MB (agent/datapath/loader.py). Its result only
changes with the BPF source, the table sizes and the kernel, so the loader child
saves it here: the instructions (map fds zeroed, a relocation table naming the map
each BPF_LD_IMM64 loads), every map's create attributes, and the license. The next
cold start loads that with raw syscalls (agent/datapath/cached_load.py).

The kernel part of the key is the kernel's build (release, version string with its build
date, machine, and the size of its BTF), not its boot: the instructions depend on UAPI
only (helper ids, __sk_buff offsets), so the program is compiled once per kernel and a
reboot into the same kernel loads it from here. Whatever the key, the kernel's verifier
checks the program again at every load. The pin directory is not in the key: pin paths
only tell BCC where to pin, they are not in the instructions.

Root's alone: the directory 0700, entries 0600, never read through a symlink, never
trusted when another user owns them or may write them (a planted program would run
in the kernel on every container's packets). A digest over the content catches a
torn or corrupt file. Any doubt makes the entry a miss, and the loader rewrites it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import stat

# CPython's own blake2b (what hashlib.blake2b is): importing hashlib would load OpenSSL's
# libcrypto (+3.4 MB resident) into the long-running agent for these few digests.
from _blake2 import blake2b
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from agent.datapath.attach import PROGRAM_NAME
from agent.datapath.maps import MAP_PINS, POLICY_TABLE_SIZE
from agent.datapath.percpu import possible_cpus
from agent.errors import UserError
from agent.lockfile import private_dir

log = logging.getLogger(__name__)

CACHE_DIR = Path("/var/cache/egress-top")
CACHE_DIR_ENV = "EGRESS_TOP_PROGRAM_CACHE"  # tests point it at a directory of their own
CACHE_FORMAT = 2  # 2: blake2b digests and keys
_VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")
_KERNEL_STAMP_PREFIX = 16  # hex digits of the kernel's digest that start an entry's name
MAX_ENTRIES = 16  # a developer editing bpf/ makes one per build; a host, one per table size


@dataclass(frozen=True)
class MapSpec:
    """A map as BPF_MAP_CREATE makes it; `pinned` maps live under the pin directory by `name`."""

    name: str
    pinned: bool
    map_type: int
    key_size: int
    value_size: int
    max_entries: int
    map_flags: int


@dataclass(frozen=True)
class CompiledProgram:
    name: str
    license: str
    instructions: bytes  # struct bpf_insn[], the map fd of each relocation zeroed
    maps: tuple[MapSpec, ...]
    relocations: tuple[tuple[int, str], ...]  # (instruction index, map name)


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV) or CACHE_DIR)


def kernel_stamp() -> str:
    """Which kernel build: another kernel misses, so a program built for it never loads."""
    uname = os.uname()
    parts = [uname.release, uname.version, uname.machine]
    with contextlib.suppress(OSError):
        parts.append(str(os.stat(_VMLINUX_BTF).st_size))
    return new_digest("\0".join(parts).encode()).hexdigest()[:_KERNEL_STAMP_PREFIX]


def new_digest(data: bytes = b"") -> blake2b:
    return blake2b(data, digest_size=32)


def add_sources(digest: blake2b, source_dir: Path) -> None:
    """The BPF sources, each by name and content, into digest."""
    for source in sorted(source_dir.glob("*.[ch]")):
        digest.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")


def cache_key(flow_table_size: int, source_dir: Path) -> str:
    """Everything the compiled instructions depend on; a file name of its own."""
    digest = new_digest(f"format {CACHE_FORMAT}\0".encode())
    add_sources(digest, source_dir)
    digest.update(
        f"FLOW_TABLE_SIZE={flow_table_size}\0POLICY_TABLE_SIZE={POLICY_TABLE_SIZE}\0POSSIBLE_CPUS={possible_cpus()}\0"
        f"pins={','.join(sorted(MAP_PINS))}\0program={PROGRAM_NAME}".encode()
    )
    return f"{kernel_stamp()}-{digest.hexdigest()}"


def _encode(program: CompiledProgram) -> dict:  # type: ignore[type-arg]
    body = asdict(program)
    body["instructions"] = base64.b64encode(program.instructions).decode()
    return body


def _digest(key: str, body: dict) -> str:  # type: ignore[type-arg]
    return new_digest(json.dumps([key, body], sort_keys=True).encode()).hexdigest()


def save(key: str, program: CompiledProgram) -> None:
    """Write the entry atomically (a reader sees the old one or the new one); drop entries
    of other kernels. A cache that cannot be written only costs the next compile."""
    try:
        directory = private_dir(cache_dir())
        body = _encode(program)
        text = json.dumps({"format": CACHE_FORMAT, "key": key, "digest": _digest(key, body), "program": body})
        partial = directory / f".{key}.{os.getpid()}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as file:
            file.write(text.encode())
        os.replace(partial, directory / f"{key}.json")
        _prune(directory, keep=directory / f"{key}.json")
    except (OSError, UserError) as exc:
        log.warning(
            "cannot save the compiled program in %s (%s): the next cold start compiles again",
            cache_dir(),
            exc,
        )


def _prune(directory: Path, keep: Path) -> None:
    """Entries of other kernels never load again: drop them. Of this kernel's
    (one per source version and table size) keep `keep` and the newest others."""
    kernel = keep.name.split("-", 1)[0]
    dated = []
    for entry in directory.glob("*.json"):
        with contextlib.suppress(FileNotFoundError):  # another process pruning at once
            dated.append((entry.lstat().st_mtime_ns, entry))
    this_kernel = sorted((item for item in dated if item[1].name.startswith(kernel)), reverse=True)
    kept = {keep, *[entry for _, entry in this_kernel if entry != keep][: MAX_ENTRIES - 1]}
    for _, entry in dated:
        if entry not in kept:
            entry.unlink(missing_ok=True)


def has_entry(key: str) -> bool:
    """Whether an entry for key is there (load() still checks it)."""
    return (cache_dir() / f"{key}.json").exists()


def load(key: str) -> CompiledProgram | None:
    """The entry for key, or None when it is absent, foreign, writable by others or corrupt."""
    directory = cache_dir()
    if not _trusted(os.lstat(directory) if directory.is_dir() else None, directory, stat.S_ISDIR):
        return None
    path = directory / f"{key}.json"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None  # absent, or a symlink (ELOOP)
    try:
        if not _trusted(os.fstat(fd), path, stat.S_ISREG):
            return None
        with os.fdopen(os.dup(fd), "rb") as file:
            text = file.read()
    finally:
        os.close(fd)
    try:
        entry = json.loads(text)
        body = entry["program"]
        if entry["format"] != CACHE_FORMAT or entry["key"] != key or entry["digest"] != _digest(key, body):
            raise ValueError("digest or key mismatch")
        return CompiledProgram(
            name=body["name"],
            license=body["license"],
            instructions=base64.b64decode(body["instructions"], validate=True),
            maps=tuple(MapSpec(**spec) for spec in body["maps"]),
            relocations=tuple((int(index), str(name)) for index, name in body["relocations"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring the corrupt compiled program %s (%s): compiling again", path, exc)
        return None


def _trusted(info: os.stat_result | None, path: Path, is_kind: Callable[[int], bool]) -> bool:
    """Root's, of the right kind, and nobody else may write it."""
    if info is None:
        return False
    if not is_kind(info.st_mode) or info.st_uid != 0 or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        log.warning(
            "ignoring %s: not root's alone (uid %d, mode %o); compiling again",
            path,
            info.st_uid,
            stat.S_IMODE(info.st_mode),
        )
        return False
    return True
