"""BPF_PROG_TEST_RUN (bpf(2) command 10) on a loaded tc program, by raw syscall.

For a tc program the kernel wraps the frame in an skb on the device that the context's
ifindex names (the loopback device for 0 or 1), sets skb->protocol from the Ethernet
header and returns the program's verdict; it refuses (EINVAL) an IPv4/IPv6 frame
shorter than its fixed IP header.
"""

from __future__ import annotations

import ctypes
import struct
from dataclasses import dataclass

from c_layout import c_values

from agent.datapath.syscalls import BPF_PROG_TEST_RUN, TestRunAttr, sys_bpf

TC_ACT_UNSPEC, TC_ACT_SHOT = 0xFFFFFFFF, 2  # retval is a u32: -1 is UNSPEC


@dataclass
class Program:
    fd: int
    ctx: ctypes.Array  # type: ignore[type-arg]  # a struct __sk_buff prefix: everything zero but ifindex

    def run(self, frame: bytes) -> int:
        data = ctypes.create_string_buffer(frame, len(frame))
        out = ctypes.create_string_buffer(len(frame) + 256)
        attr = TestRunAttr(
            prog_fd=self.fd,
            data_size_in=len(frame),
            data_size_out=len(out),
            data_in=ctypes.addressof(data),
            data_out=ctypes.addressof(out),
            repeat=1,
            ctx_size_in=len(self.ctx),
            ctx_in=ctypes.addressof(self.ctx),
        )
        sys_bpf(BPF_PROG_TEST_RUN, attr)
        return attr.retval


def skb_context(ifindex: int) -> ctypes.Array:  # type: ignore[type-arg]
    """A struct __sk_buff prefix that ends with ifindex (its offset from the compiled uapi
    header): the kernel accepts a shorter context, and wants the fields it ignores zero."""
    layout = c_values(["offsetof(struct __sk_buff, ifindex)"], includes=("linux/bpf.h",))
    offset = layout["offsetof(struct __sk_buff, ifindex)"]
    ctx = ctypes.create_string_buffer(offset + 4)
    struct.pack_into("=I", ctx, offset, ifindex)
    return ctx
