"""The loaded program: which build serves this datapath, loading it in a child, opening its pin.

BCC and LLVM stay out of this process: a short-lived child (agent/datapath/loader.py)
compiles, loads and pins the program next to the maps, and leaves what it compiled
in a cache (agent/datapath/program_cache.py) that later cold starts load by raw
syscalls, without the child. The pin's name carries a fingerprint of the source, the
table sizes and the kernel, so a process that finds a matching pin attaches it at
once, loading nothing.
"""

from __future__ import annotations

import importlib.resources
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from agent.datapath import program_cache
from agent.datapath.attach import attach
from agent.datapath.cached_load import load_compiled
from agent.datapath.maps import (
    DEFAULT_FLOW_TABLE_SIZE,
    PIN_DIR,
    POLICY_TABLE_SIZE,
    Maps,
    pinned_flow_table_size,
    pins_exist,
)
from agent.datapath.percpu import possible_cpus
from agent.datapath.syscalls import obj_get, obj_pin
from agent.errors import EXIT_KERNEL, UserError

log = logging.getLogger(__name__)

PROGRAM_PIN_PREFIX = "program-"
LOADER_TIMEOUT_SECONDS = 120


def bpf_source_dir() -> Path:
    return Path(str(importlib.resources.files("agent.bpf") / "egress.c")).parent


def program_fingerprint(flow_table_size: int, pin_dir: Path = PIN_DIR) -> str:
    """Changes whenever a rebuild would give another program: source, sizes, pin paths, kernel."""
    digest = program_cache.new_digest()
    program_cache.add_sources(digest, bpf_source_dir())
    digest.update(
        f"{flow_table_size}/{POLICY_TABLE_SIZE}/{possible_cpus()}/{pin_dir}/{os.uname().release}".encode()
    )
    return digest.hexdigest()[:16]


def program_pin(flow_table_size: int, pin_dir: Path = PIN_DIR) -> Path:
    return pin_dir / f"{PROGRAM_PIN_PREFIX}{program_fingerprint(flow_table_size, pin_dir)}"


def pinned_program_matches(flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE, pin_dir: Path = PIN_DIR) -> bool:
    """The program this source builds is pinned with its maps: opening the datapath
    compiles nothing (so it needs no kernel headers)."""
    size = pinned_flow_table_size(pin_dir) or flow_table_size
    return pins_exist(pin_dir) and program_pin(size, pin_dir).exists()


def needs_compile(flow_table_size: int, pin_dir: Path = PIN_DIR) -> bool:
    """A first start: nothing of ours is pinned and the cache holds no build of this
    source for this kernel, so opening the datapath compiles (~1 s)."""
    key = program_cache.cache_key(flow_table_size, bpf_source_dir())
    return not pin_dir.exists() and not program_cache.has_entry(key)


class Datapath(Maps):
    """The pinned program plus its pinned maps. Use lifecycle.open_datapath() to get one."""

    def __init__(self, flow_table_size: int = DEFAULT_FLOW_TABLE_SIZE, pin_dir: Path = PIN_DIR):
        flow_table_size = _flow_table_in_force(flow_table_size, pin_dir)
        pin = program_pin(flow_table_size, pin_dir)
        if not (pin.exists() and pins_exist(pin_dir)) and not load_from_cache(flow_table_size, pin_dir):
            run_loader(flow_table_size, pin_dir)
        self.program_fd = obj_get(pin)
        super().__init__(pin_dir)

    def attach(self, ifindex: int) -> None:
        attach(ifindex, self.program_fd)

    def close(self) -> None:
        super().close()
        os.close(self.program_fd)


def _flow_table_in_force(requested: int, pin_dir: Path) -> int:
    """A pinned flow table is never swapped: another process may be reading it."""
    pinned = pinned_flow_table_size(pin_dir)
    if pinned is None or pinned == requested:
        return requested
    log.warning(
        "keeping the pinned flow table of %d entries (another egress-top, the agent or rules use it): "
        "--flow-table-size %d applies once none of them runs",
        pinned,
        requested,
    )
    return pinned


def load_cached_build(flow_table_size: int, pin_dir: Path) -> int | None:
    """The fd of a new load of the build the cache holds for this source and kernel (its
    maps opened from, or created and pinned in, pin_dir), without BCC; None when there is
    none or it would not load."""
    compiled = program_cache.load(program_cache.cache_key(flow_table_size, bpf_source_dir()))
    if compiled is None:
        return None
    pin_dir.mkdir(parents=True, exist_ok=True)
    return load_compiled(compiled, pin_dir)


def load_from_cache(flow_table_size: int, pin_dir: Path) -> bool:
    """Load and pin the build the cache holds for this source and kernel, without BCC;
    False when there is none (or it would not load): then the loader compiles."""
    program_fd = load_cached_build(flow_table_size, pin_dir)
    if program_fd is None:
        return False
    try:
        replace_program_pins(program_fd, program_pin(flow_table_size, pin_dir))
    finally:
        os.close(program_fd)
    return pins_exist(pin_dir)


def replace_program_pins(program_fd: int, pin: Path) -> None:
    """Pin this build; unpin older builds (filters still using one keep it alive)."""
    pin.unlink(missing_ok=True)
    obj_pin(program_fd, pin)
    for old in pin.parent.glob(f"{PROGRAM_PIN_PREFIX}*"):
        if old != pin:
            old.unlink(missing_ok=True)


def run_loader(flow_table_size: int, pin_dir: Path) -> None:
    """Compile, load and pin in a child; its UserError comes back as ours."""
    start_loader(flow_table_size, pin_dir).wait()


def start_loader(flow_table_size: int, pin_dir: Path, exclusive: bool = False) -> LoaderChild:
    """The loader child, started; exclusive: it takes the datapath lock itself and compiles
    only if nothing is pinned by then (the caller does not hold the lock)."""
    command = [
        sys.executable,
        "-P",  # never import from the working directory: this runs as root
        "-m",
        "agent.datapath.loader",
        "--flow-table-size",
        str(flow_table_size),
        "--pin-dir",
        str(pin_dir),
    ]
    if exclusive:
        command.append("--exclusive")
    if log.isEnabledFor(logging.DEBUG):
        command.append("--verbose")
    return LoaderChild(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))


class LoaderChild:
    """A running loader child; wait() for its outcome."""

    def __init__(self, process: subprocess.Popen[str]):
        self.process = process

    def wait(self) -> None:
        """Until it exits; its UserError raised as ours."""
        try:
            stdout, stderr = self.process.communicate(timeout=LOADER_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise UserError(
                f"the BPF loader did not finish within {LOADER_TIMEOUT_SECONDS}s: run with --verbose",
                EXIT_KERNEL,
            ) from None
        if self.process.returncode == 0:
            for line in stderr.splitlines():
                log.warning("%s", line)  # the loader's own log lines (header fallback...)
            return
        report = _error_report(stdout)
        if report is None:
            raise UserError(
                f"the BPF loader failed (exit {self.process.returncode}): run with --verbose for its log",
                EXIT_KERNEL,
                detail=stderr.strip(),
            )
        raise UserError(report["message"], report["exit_code"], detail=report.get("detail"))


def _error_report(stdout: str) -> dict | None:  # type: ignore[type-arg]
    lines = stdout.strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None
