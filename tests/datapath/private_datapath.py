"""A datapath of the tests' own (pins in a private bpffs directory, never the live one),
veths for BPF_PROG_TEST_RUN to run on, and UDP frames to run."""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from frames import ETH_HLEN, ETH_P_IP, UDP, ethernet, ipv4, transport
from lab import PREFIX, RUN

from agent.datapath import Datapath
from agent.datapath.maps import VETH_COUNTER_SLOTS

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@contextlib.contextmanager
def private_datapath(flow_table_size: int) -> Iterator[Datapath]:
    pin_dir = Path(tempfile.mkdtemp(prefix="egress-top-test-", dir="/sys/fs/bpf"))
    try:
        datapath = Datapath(flow_table_size=flow_table_size, pin_dir=pin_dir)
        try:
            yield datapath
        finally:
            datapath.close()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


def write_veth_slot(datapath: Datapath, ifindex: int, copies: bytes) -> None:
    """Every CPU's copy of the veth_counters slot of ifindex (bpf/egress_maps.h, struct
    veth_counters: CPU c's slots follow c - 1's), from copies laid end to end; b"" zeroes them."""
    size = datapath.veth_counters.value_size
    cpus = datapath.veth_counters.max_entries // VETH_COUNTER_SLOTS
    for cpu in range(cpus):
        index = cpu * VETH_COUNTER_SLOTS + ifindex % VETH_COUNTER_SLOTS
        datapath.veth_counters.update(index.to_bytes(4, "little"), copies[cpu * size : (cpu + 1) * size])


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


@contextlib.contextmanager
def veths(count: int) -> Iterator[list[int]]:
    """`count` veths (each with its peer) in a netns of our own, this thread inside it for the block: the
    ifindex values a test run's context may name (BPF_PROG_TEST_RUN looks the device up in
    the caller's netns). Nothing is sent anywhere; the netns goes away afterwards."""
    netns = f"{PREFIX}-dp-{RUN}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", netns], check=True, capture_output=True)
    try:
        names = [f"dp{n}" for n in range(count)]
        for name in names:
            subprocess.run(
                ["ip", "-n", netns, "link", "add", name, "type", "veth", "peer", "name", f"{name}p"],
                check=True,
            )
        links = json.loads(
            subprocess.run(
                ["ip", "-n", netns, "-j", "link", "show"], check=True, capture_output=True, text=True
            ).stdout
        )
        ifindex = {link["ifname"]: link["ifindex"] for link in links}
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            _setns(target)
            try:
                yield [ifindex[name] for name in names]
            finally:
                _setns(home)
        finally:
            os.close(target)
            os.close(home)
    finally:
        subprocess.run(["ip", "netns", "del", netns], check=False, capture_output=True)


@contextlib.contextmanager
def on_one_cpu() -> Iterator[None]:
    """Pin this thread to one CPU: one per-CPU copy (veth counters) then sees every packet."""
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(before)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def udp_frame(src: str, dst: str, src_port: int, dst_port: int, payload_bytes: int = 64) -> bytes:
    body = transport(UDP, src_port, dst_port, bytes(payload_bytes))
    return ethernet(ETH_P_IP, ipv4(src, dst, UDP, body, 0, 0, 0))


def ip_bytes(frame: bytes) -> int:
    return len(frame) - ETH_HLEN
