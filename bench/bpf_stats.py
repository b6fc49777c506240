"""What a tc program costs per packet, from the kernel's own accounting.

With kernel.bpf_stats_enabled on, the kernel adds up run_time_ns and run_cnt for every BPF
program. The programs measured here sit on a veth's ingress hook and may have been loaded
by another process (the agent's loader runs in a child), so they are found by the program
id the tc filter holds and read through raw syscalls (BPF_PROG_GET_FD_BY_ID,
BPF_OBJ_GET_INFO_BY_FD), as the agent reads its pinned maps. The trivial program
(`return TC_ACT_OK`) is the floor every figure is divided by: the hook, the call and the
statistics' own two clock reads, which every measured program pays alike. The one-slot
programs (ONE_SLOT_PER_FLOW, ONE_HASHED_SLOT_PER_FLOW) are the floors of counting flows at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.datapath import detach
from agent.datapath.attach import attach
from agent.datapath.percpu import possible_cpus
from agent.datapath.syscalls import sys_bpf

STATS_SYSCTL = Path("/proc/sys/kernel/bpf_stats_enabled")
BPF_PROG_GET_FD_BY_ID = 13
BPF_OBJ_GET_INFO_BY_FD = 15


@dataclass(frozen=True)
class BenchSource:
    """A bench-only tc program: its function name and its C (BCC)."""

    name: str
    text: str


TRIVIAL = BenchSource(
    "ettb_trivial",
    "#include <uapi/linux/pkt_cls.h>\nint ettb_trivial(struct __sk_buff *skb) { return TC_ACT_OK; }\n",
)

FLOW_SLOT_SLOTS = 1024


def _one_slot_per_flow(name: str, index: str) -> BenchSource:
    """One 64-byte slot per flow and CPU, found by `index` (C, of the UDP destination port
    `port`), two plain adds: no table, no atomics. The slots are a plain array, each CPU's
    one after the other, as our flow cache's sets are: the cheaper of the two ways to keep
    per-CPU slots (a per-CPU array reaches each through a table of pointers)."""
    return BenchSource(
        name,
        f"""#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
struct flow_slot {{ __u64 packets; __u64 bytes; __u64 pad[6]; }};
BPF_ARRAY(flow_slots, struct flow_slot, {possible_cpus() * FLOW_SLOT_SLOTS});
int {name}(struct __sk_buff *skb)
{{
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct udphdr *udp = data + sizeof(struct ethhdr) + sizeof(struct iphdr);
	if ((void *)(udp + 1) > end)
		return TC_ACT_OK;
	__u32 port = bpf_ntohs(udp->dest);
	__u32 index = bpf_get_smp_processor_id() * {FLOW_SLOT_SLOTS} + ({index}) % {FLOW_SLOT_SLOTS};
	struct flow_slot *slot = flow_slots.lookup(&index);
	if (slot) {{
		slot->packets += 1;
		slot->bytes += skb->len;
	}}
	return TC_ACT_OK;
}}
""",
    )


# The least a per-flow counter can do: find its flow's slot without hashing (the UDP
# destination port, which the per-packet bench gives each of its flows, counting up) and add
# to one 64-byte per-CPU slot. Over 1,000 flows its cost above the trivial program is what
# touching one cache line per flow costs here when the lines come in order (the CPU's
# prefetcher sees the next one coming): a floor no design that must find a flow from its
# 5-tuple reaches.
ONE_SLOT_PER_FLOW = _one_slot_per_flow("ettb_one_slot", "port")
# The same slot found by a multiplicative hash of the port, as a design that cannot index
# flows by their port must find it: the lines come in no order. The floor under any exact
# flow counter that hashes, ours included (which also hashes the whole 5-tuple and compares
# it, and keeps a flow's last-seen time).
ONE_HASHED_SLOT_PER_FLOW = _one_slot_per_flow("ettb_hashed_slot", "(port * 0x9e3779b1u) >> 16")


class _ProgGetFdAttr(ctypes.Structure):
    _fields_ = [("prog_id", ctypes.c_uint32), ("next_id", ctypes.c_uint32), ("open_flags", ctypes.c_uint32)]


class _InfoAttr(ctypes.Structure):
    _fields_ = [("bpf_fd", ctypes.c_uint32), ("info_len", ctypes.c_uint32), ("info", ctypes.c_uint64)]


class ProgInfo(ctypes.Structure):
    """struct bpf_prog_info (linux/bpf.h) up to run_cnt: the kernel fills what we ask for."""

    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
        ("ifindex", ctypes.c_uint32),
        ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64),
        ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32),
        ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64),
        ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32),
        ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64),
        ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32),
        ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64),
        ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32),
        ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32),
        ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64),
        ("run_cnt", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class Counters:
    run_time_ns: int
    run_cnt: int


def program_counters(program_id: int) -> Counters:
    fd = sys_bpf(BPF_PROG_GET_FD_BY_ID, _ProgGetFdAttr(program_id, 0, 0))
    try:
        info = ProgInfo()
        sys_bpf(BPF_OBJ_GET_INFO_BY_FD, _InfoAttr(fd, ctypes.sizeof(info), ctypes.addressof(info)))
    finally:
        os.close(fd)
    if info.id != program_id:
        raise RuntimeError(f"bpf_prog_info of program {program_id} says id {info.id}: layout mismatch")
    return Counters(info.run_time_ns, info.run_cnt)


def attached_program_id(ifindex: int) -> int:
    """The id of the one BPF program on the veth's ingress hook (from tc: pyroute2 does not
    decode TCA_BPF_ID)."""
    device = socket.if_indextoname(ifindex)
    shown = subprocess.run(
        ["tc", "-j", "filter", "show", "dev", device, "ingress"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    ids = [f["options"]["prog"]["id"] for f in json.loads(shown or "[]") if "prog" in f.get("options", {})]
    if len(ids) != 1:
        raise RuntimeError(f"expected one BPF program on {device}'s ingress hook, found {ids}")
    return int(ids[0])


def cost(before: Counters, after: Counters, seconds: float) -> dict[str, Any]:
    runs, busy_ns = after.run_cnt - before.run_cnt, after.run_time_ns - before.run_time_ns
    return {
        "runs": runs,
        "ns_per_run": busy_ns / runs if runs else None,
        "runs_per_second": runs / seconds,
        "cpu_share": busy_ns / (seconds * 1e9),
    }


@contextlib.contextmanager
def statistics_enabled() -> Iterator[None]:
    """kernel.bpf_stats_enabled on for the block, back to what it was afterwards."""
    before = STATS_SYSCTL.read_text().strip()
    STATS_SYSCTL.write_text("1\n")
    try:
        yield
    finally:
        STATS_SYSCTL.write_text(f"{before}\n")


class BenchProgram:
    """A bench-only program, compiled by BCC in this process, attached where ours goes (same
    hook, priority and handle, so detach() removes it as it removes ours)."""

    def __init__(self, source: BenchSource) -> None:
        from bcc import BPF

        self.source = source
        self.bpf = BPF(text=source.text)
        self.function = self.bpf.load_func(source.name.encode(), BPF.SCHED_CLS)

    def attach(self, ifindex: int) -> None:
        attach(ifindex, self.function.fd, name=self.source.name)

    @staticmethod
    def detach(ifindex: int) -> None:
        detach(ifindex)

    def close(self) -> None:
        self.bpf.cleanup()
