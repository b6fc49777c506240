"""The bpf syscall number per architecture, and the error on a machine we do not know."""

from __future__ import annotations

import platform
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from agent.datapath import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE, Datapath
from agent.datapath.maps import BPFFS
from agent.datapath.pinned import BATCH_CHUNK
from agent.datapath.syscalls import bpf_syscall_number
from agent.errors import EXIT_KERNEL, UserError


@pytest.mark.parametrize(
    ("machine", "number"),
    [("x86_64", 321), ("aarch64", 280), ("armv7l", 386), ("ppc64le", 361), ("s390x", 351), ("riscv64", 280)],
)
def test_bpf_syscall_number_per_architecture(machine: str, number: int) -> None:
    assert bpf_syscall_number(machine) == number


def test_unknown_architecture_is_a_one_line_error() -> None:
    with pytest.raises(UserError) as raised:
        bpf_syscall_number("pdp11")
    message = str(raised.value)
    assert raised.value.exit_code == EXIT_KERNEL
    assert "\n" not in message
    assert message.startswith("unsupported architecture 'pdp11'")
    assert "x86_64" in message and "aarch64" in message


def test_this_machine_is_known() -> None:
    assert bpf_syscall_number() == bpf_syscall_number(platform.machine())


def packets_by_port(keys: np.ndarray, stats: np.ndarray) -> dict[tuple[int, int], int]:
    return {
        (int(key["src_port"]), int(key["dst_port"])): int(value["packets"])
        for key, value in zip(keys, stats, strict=True)
    }


def test_batch_lookup_reads_every_entry_of_a_table_larger_than_one_chunk() -> None:
    """BPF_MAP_LOOKUP_BATCH by raw syscall on a real pinned flow table, across chunk borders."""
    pin_dir = Path(tempfile.mkdtemp(prefix="ett-batch-", dir=BPFFS))
    datapath = Datapath(flow_table_size=131072, pin_dir=pin_dir)
    try:
        entries = 3 * BATCH_CHUNK + 5
        keys = np.zeros(entries, FLOW_KEY_DTYPE)
        keys["ifindex"] = 7
        keys["family"] = 4
        keys["proto"] = 17
        keys["src_port"] = np.arange(entries) % 65536
        keys["dst_port"] = np.arange(entries) // 65536 + 1
        stats = np.zeros(entries, FLOW_STATS_DTYPE)
        stats["packets"] = np.arange(entries) + 1
        for key, value in zip(keys, stats, strict=True):
            datapath.flows.update(key.tobytes(), value.tobytes())
        read = datapath.read_flows()
        assert len(read.keys) == entries
        assert packets_by_port(read.keys, read.stats) == packets_by_port(keys, stats)
    finally:
        datapath.close()
        shutil.rmtree(pin_dir)
