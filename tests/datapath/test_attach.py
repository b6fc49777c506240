"""agent/datapath/attach.py against the kernel: a counting program put on a veth's ingress
hook in a netns of this test's own, seen by `tc`, counting real packets, and removed.

The program (raw instructions, no BCC) adds one to an array map per packet and passes it;
the packets are UDP datagrams sent from the veth's peer netns to a socket on the veth
that counts what it got. Needs root, not Docker.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import socket
import struct
import subprocess
from collections.abc import Iterator

import pytest
from lab import wait_until
from netns_pair import ADDRESS_V4, NetnsPair, netns_pair

from agent.datapath import attach as tc
from agent.datapath.cached_load import (
    BPF_MAP_CREATE,
    BPF_PROG_LOAD,
    BPF_PROG_TYPE_SCHED_CLS,
    MapCreateAttr,
    ProgLoadAttr,
)
from agent.datapath.syscalls import BPF_MAP_LOOKUP_ELEM, MapElemAttr, address, fd_info, sys_bpf

pytestmark = pytest.mark.system
BPF_MAP_TYPE_ARRAY = 2
PORT = 40777
_INSN = struct.Struct("=BBhi")  # code, dst | src << 4, offset, immediate


def _counting_instructions(map_fd: int) -> bytes:
    """counter[0] += 1 (atomic); return TC_ACT_OK."""
    return b"".join(
        _INSN.pack(*insn)
        for insn in (
            (0x62, 0x0A, -4, 0),  # *(u32 *)(r10 - 4) = 0: the key
            (0xBF, 0xA2, 0, 0),  # r2 = r10
            (0x07, 0x02, 0, -4),  # r2 += -4
            (0x18, 0x11, 0, map_fd),  # r1 = the map (BPF_LD_IMM64, BPF_PSEUDO_MAP_FD) ...
            (0x00, 0x00, 0, 0),  # ... its second half
            (0x85, 0x00, 0, 1),  # call bpf_map_lookup_elem
            (0x15, 0x00, 2, 0),  # if r0 == 0 goto exit
            (0xB7, 0x01, 0, 1),  # r1 = 1
            (0xDB, 0x10, 0, 0),  # lock *(u64 *)(r0 + 0) += r1
            (0xB7, 0x00, 0, 0),  # r0 = TC_ACT_OK
            (0x95, 0x00, 0, 0),  # exit
        )
    )


class CountingProgram:
    def __init__(self, name: str):
        self.name = name
        self.map_fd = sys_bpf(
            BPF_MAP_CREATE,
            MapCreateAttr(map_type=BPF_MAP_TYPE_ARRAY, key_size=4, value_size=8, max_entries=1),
        )
        code = _counting_instructions(self.map_fd)
        instructions = ctypes.create_string_buffer(code, len(code))
        license_text = ctypes.create_string_buffer(b"GPL")
        self.fd = sys_bpf(
            BPF_PROG_LOAD,
            ProgLoadAttr(
                prog_type=BPF_PROG_TYPE_SCHED_CLS,
                insn_cnt=len(code) // _INSN.size,
                insns=address(instructions),
                license=address(license_text),
                prog_name=name.encode(),
            ),
        )
        self.id = int(fd_info(self.fd)["prog_id"])

    def count(self) -> int:
        key, value = ctypes.c_uint32(0), ctypes.c_uint64(0)
        sys_bpf(
            BPF_MAP_LOOKUP_ELEM,
            MapElemAttr(map_fd=self.map_fd, key=ctypes.addressof(key), value=ctypes.addressof(value)),
        )
        return value.value

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.map_fd)


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as made:
        yield made


@pytest.fixture
def programs() -> Iterator[list[CountingProgram]]:
    loaded = [CountingProgram("ett_nl_count_a"), CountingProgram("ett_nl_count_b")]
    yield loaded
    for program in loaded:
        program.close()


class Receiver:
    """A UDP socket on a0's address in netns a, and the datagrams it got so far."""

    def __init__(self, pair: NetnsPair):
        def bound() -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((ADDRESS_V4, PORT))
            sock.setblocking(False)
            return sock

        self._socket: socket.socket = pair.run_in(pair.a, bound)
        self._pair = pair
        self.got = 0

    def _drain(self) -> int:
        while True:
            try:
                self._socket.recv(2048)
            except BlockingIOError:
                return self.got
            self.got += 1

    def send_and_wait(self, count: int) -> None:
        """count datagrams from netns b; waits until all of them arrived."""
        expected = self.got + count

        def send() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
                for number in range(count):
                    sock.sendto(b"ett-nl %d" % number, (ADDRESS_V4, PORT))

        self._pair.run_in(self._pair.b, send)
        wait_until(lambda: self._drain() >= expected, timeout=5)
        assert self._drain() == expected

    def close(self) -> None:
        self._socket.close()


@pytest.fixture
def receiver(pair: NetnsPair) -> Iterator[Receiver]:
    made = Receiver(pair)
    yield made
    made.close()


def tc_show(pair: NetnsPair, *what: str) -> list[str]:
    shown = subprocess.run(
        ["ip", "netns", "exec", pair.a, "tc", *what], check=True, capture_output=True, text=True, timeout=30
    ).stdout
    return [line.strip() for line in shown.splitlines()]


def ingress_filters(pair: NetnsPair) -> list[str]:
    return tc_show(pair, "filter", "show", "dev", "a0", "ingress")


def our_filter_lines(program: CountingProgram, name: str = tc.PROGRAM_NAME) -> list[str]:
    """What `tc filter show` said of pyroute2's attach: the chain entry, then the filter."""
    return [
        "filter protocol all pref 231 bpf chain 0",
        f"filter protocol all pref 231 bpf chain 0 handle 0xe7 flowid :1 {name} direct-action not_in_hw "
        f"id {program.id} name {program.name} tag TAG jited",
    ]


def with_tag_hidden(lines: list[str]) -> list[str]:
    return [re.sub(r" tag [0-9a-f]{16} ", " tag TAG ", line) for line in lines]


def a0_index(pair: NetnsPair) -> int:
    return pair.run_in(pair.a, lambda: socket.if_nametoindex("a0"))


def test_attach_shows_in_tc_counts_every_packet_and_detach_removes_filter_and_clsact(
    pair: NetnsPair, programs: list[CountingProgram], receiver: Receiver
) -> None:
    program, index = programs[0], a0_index(pair)
    receiver.send_and_wait(3)  # control: the pair carries datagrams before anything is attached
    assert program.count() == 0

    pair.run_in(pair.a, lambda: tc.attach(index, program.fd))
    assert with_tag_hidden(ingress_filters(pair)) == our_filter_lines(program)
    assert pair.run_in(pair.a, tc.our_filters) == {index: "a0"}
    receiver.send_and_wait(5)
    assert program.count() == 5

    pair.run_in(pair.a, lambda: tc.detach(index))
    assert ingress_filters(pair) == []
    assert not any("clsact" in line for line in tc_show(pair, "qdisc", "show", "dev", "a0"))
    assert pair.run_in(pair.a, tc.our_filters) == {}
    receiver.send_and_wait(4)
    assert program.count() == 5


def test_attach_again_replaces_the_program_in_the_same_slot(
    pair: NetnsPair, programs: list[CountingProgram], receiver: Receiver
) -> None:
    first, second, index = programs[0], programs[1], a0_index(pair)
    pair.run_in(pair.a, lambda: tc.attach(index, first.fd))
    receiver.send_and_wait(2)
    pair.run_in(pair.a, lambda: tc.attach(index, second.fd, name="ett_nl_other"))  # clsact exists: EEXIST
    assert with_tag_hidden(ingress_filters(pair)) == our_filter_lines(second, name="ett_nl_other")
    assert pair.run_in(pair.a, tc.our_filters) == {}  # not our program's name
    receiver.send_and_wait(3)
    assert (first.count(), second.count()) == (2, 3)
    pair.run_in(pair.a, lambda: tc.detach(index))  # the slot, whatever name it holds
    assert ingress_filters(pair) == []


def test_detach_leaves_someone_elses_filters_and_their_clsact(
    pair: NetnsPair, programs: list[CountingProgram], receiver: Receiver
) -> None:
    index = a0_index(pair)
    tc_show(pair, "qdisc", "add", "dev", "a0", "clsact")
    # theirs on ingress after ours (a u32 match classifies: what comes after it never runs)
    tc_show(pair, "filter", "add", "dev", "a0", "ingress", "pref", "300", "protocol", "all", "u32", "match", "u32", "0", "0", "classid", "1:1")  # fmt: skip
    tc_show(pair, "filter", "add", "dev", "a0", "egress", "pref", "11", "protocol", "all", "bpf", "bytecode", "1,6 0 0 4294967295,", "classid", "1:1")  # fmt: skip
    theirs_ingress, theirs_egress = (
        ingress_filters(pair),
        tc_show(pair, "filter", "show", "dev", "a0", "egress"),
    )
    assert len(theirs_ingress) == 4 and len(theirs_egress) == 2

    pair.run_in(pair.a, lambda: tc.attach(index, programs[0].fd))
    assert len(ingress_filters(pair)) == 6
    receiver.send_and_wait(2)
    assert programs[0].count() == 2

    pair.run_in(pair.a, lambda: tc.detach(index))
    assert ingress_filters(pair) == theirs_ingress
    assert tc_show(pair, "filter", "show", "dev", "a0", "egress") == theirs_egress
    assert any("clsact" in line for line in tc_show(pair, "qdisc", "show", "dev", "a0"))

    tc_show(pair, "filter", "del", "dev", "a0", "ingress", "pref", "300")
    pair.run_in(pair.a, lambda: tc.detach(index))  # no filter of ours, theirs on egress: clsact stays
    assert any("clsact" in line for line in tc_show(pair, "qdisc", "show", "dev", "a0"))


def test_refusals_raise_oserror_with_the_kernels_errno_and_a_gone_veth_is_clean(
    pair: NetnsPair, programs: list[CountingProgram]
) -> None:
    with pytest.raises(OSError) as no_link:
        pair.run_in(pair.a, lambda: tc.attach(999_999, programs[0].fd))
    assert no_link.value.errno == errno.ENODEV

    not_a_program = os.open("/proc/self/stat", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as bad_fd:
            pair.run_in(pair.a, lambda: tc.attach(a0_index(pair), not_a_program))
        assert bad_fd.value.errno == errno.EINVAL
    finally:
        os.close(not_a_program)
    assert ingress_filters(pair) == []

    pair.run_in(pair.a, lambda: tc.detach(999_999))  # no error: nothing to clean
