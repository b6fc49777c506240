"""Compile bpf/egress.c with BCC, load it, pin the program beside its maps, exit.

Run as a short-lived child (`python -m agent.datapath.loader`, see program.run_loader):
BCC and LLVM cost ~165 MB resident after a compile, and none of it may stay in a
long-running agent. Pinned, the program and maps outlive this process; the caller
opens the program's pin and attaches it by fd. The caller holds the datapath lock,
or (--exclusive: a first start's early compile, lifecycle.start_loading) we take it.
What it compiled goes to the program cache (agent/datapath/program_cache.py), so the
next cold start of this source on this kernel loads it without BCC and without us.

A UserError is reported as one JSON line on stdout (message, exit code, detail), so
the caller can raise it as its own.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from agent.datapath import program_cache
from agent.datapath.attach import PROGRAM_NAME
from agent.datapath.cached_load import map_id, map_spec, relocations_of, with_map_fds
from agent.datapath.headers import ensure_kernel_headers
from agent.datapath.lifecycle import exclusive
from agent.datapath.maps import MAP_PINS, POLICY_TABLE_SIZE
from agent.datapath.percpu import possible_cpus
from agent.datapath.program import bpf_source_dir, program_pin, replace_program_pins
from agent.datapath.program_cache import CompiledProgram
from agent.datapath.syscalls import obj_get
from agent.errors import EXIT_KERNEL, UserError

log = logging.getLogger(__name__)


def load_and_pin(flow_table_size: int, pin_dir: Path) -> Path:
    ensure_kernel_headers()
    pin_dir.mkdir(parents=True, exist_ok=True)
    from bcc import BPF  # imported late: costs ~70 MB and needs root

    source = bpf_source_dir() / "egress.c"
    cflags = [
        f"-I{source.parent}",
        f"-DFLOW_TABLE_SIZE={flow_table_size}",
        f"-DPOLICY_TABLE_SIZE={POLICY_TABLE_SIZE}",
        f"-DPOSSIBLE_CPUS={possible_cpus()}",
        *(f'-D{macro}="{pin_dir / name}"' for name, macro in MAP_PINS.items()),
    ]
    with tempfile.TemporaryDirectory(prefix="egress-top-") as tmp:
        log_path = Path(tmp) / "bcc.log"
        try:
            with _stderr_to(log_path):
                bpf = BPF(src_file=str(source).encode(), cflags=cflags)
                program = bpf.load_func(PROGRAM_NAME.encode(), BPF.SCHED_CLS)
        except Exception as exc:
            lines = log_path.read_text(errors="replace").strip().splitlines()
            reason = next((line for line in lines if "error" in line.lower()), str(exc))
            raise UserError(
                f"the kernel refused the BPF program ({reason.strip()}): run with --verbose for the full log",
                EXIT_KERNEL,
                detail="\n".join(lines[-40:]),
            ) from None
    pin = program_pin(flow_table_size, pin_dir)
    replace_program_pins(program.fd, pin)
    try:
        compiled = _compiled(bpf, pin_dir)
    except (KeyError, OSError, ValueError) as exc:
        log.warning("cannot cache the compiled program (%s): the next cold start compiles again", exc)
    else:
        program_cache.save(program_cache.cache_key(flow_table_size, source.parent), compiled)
    return pin


def _compiled(bpf: Any, pin_dir: Path) -> CompiledProgram:
    """What loads this program again without BCC: its instructions with the map fds
    zeroed, which map each fd was (by BCC's table fds, and pinned ones by map id)."""
    from bcc.libbcc import lib

    # libbcc's table index functions, which bcc's Python binding leaves undeclared
    lib.bpf_num_tables.argtypes, lib.bpf_num_tables.restype = [ctypes.c_void_p], ctypes.c_size_t
    lib.bpf_table_fd_id.argtypes = lib.bpf_table_name.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.bpf_table_name.restype = ctypes.c_char_p
    tables = {
        lib.bpf_table_fd_id(bpf.module, index): lib.bpf_table_name(bpf.module, index).decode()
        for index in range(lib.bpf_num_tables(bpf.module))
    }
    specs = {}  # every pinned map, even one the program never loads: user space opens them all
    pins_by_id = {}
    for name in MAP_PINS:
        fd = obj_get(pin_dir / name)
        try:
            specs[name] = map_spec(fd, name, pinned=True)
            pins_by_id[map_id(fd)] = name
        finally:
            os.close(fd)
    instructions = bpf.dump_func(PROGRAM_NAME.encode())
    relocations = []
    for index, fd in relocations_of(instructions):
        name = pins_by_id.get(map_id(fd)) or tables[fd]
        specs.setdefault(name, map_spec(fd, name, pinned=False))
        relocations.append((index, name))
    return CompiledProgram(
        name=PROGRAM_NAME,
        license=lib.bpf_module_license(bpf.module).decode(),
        instructions=with_map_fds(instructions, dict.fromkeys((index for index, _ in relocations), 0)),
        maps=tuple(specs.values()),
        relocations=tuple(relocations),
    )


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.datapath.loader", description=__doc__)
    parser.add_argument("--flow-table-size", type=int, required=True)
    parser.add_argument("--pin-dir", type=Path, required=True)
    parser.add_argument(
        "--exclusive",
        action="store_true",
        help="take the datapath lock (the caller does not); compile only if nothing is pinned by then",
    )
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s", stream=sys.stderr
    )
    try:
        if args.exclusive:
            with exclusive():
                if not args.pin_dir.exists():  # else another process loaded it meanwhile
                    load_and_pin(args.flow_table_size, args.pin_dir)
        else:
            load_and_pin(args.flow_table_size, args.pin_dir)
    except UserError as exc:
        print(json.dumps({"message": str(exc), "exit_code": exc.exit_code, "detail": exc.detail}))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
