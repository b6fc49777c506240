"""What the host must give us before any BPF: the capabilities, and a mounted bpffs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from agent.datapath.maps import BPFFS
from agent.errors import EXIT_KERNEL, EXIT_PERMISSION, UserError

_CAP_NET_ADMIN, _CAP_SYS_ADMIN, _CAP_BPF = 12, 21, 39


def check_privileges() -> None:
    """BPF and tc need CAP_BPF/CAP_SYS_ADMIN and CAP_NET_ADMIN; root has them."""
    caps = _effective_capabilities()
    has_bpf = bool(caps & (1 << _CAP_BPF)) or bool(caps & (1 << _CAP_SYS_ADMIN))
    if not has_bpf or not caps & (1 << _CAP_NET_ADMIN):
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
