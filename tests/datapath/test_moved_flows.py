"""The channel of flows that moved: epoch, ring buffer, read by mmap without BCC (issue 11).

The compiled datapath (private pins) runs by BPF_PROG_TEST_RUN on the loopback device;
user space reads the pinned ring buffer through Maps (raw syscalls and mmap only).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from private_datapath import ip_bytes, on_one_cpu, private_datapath, udp_frame
from prog_run import Program, skb_context

from agent.datapath import FLOW_KEY_DTYPE, Datapath
from agent.datapath.flow_maps import COARSE_CLOCK_SLACK_NS, MOVED_FLOWS_BYTES
from agent.datapath.ringbuf import RINGBUF_HEADER_BYTES
from agent.table_reader import FlowTableReader

pytestmark = pytest.mark.system

IFINDEX = 1  # the loopback device
FLOWS = 100
FRAMES = [udp_frame("198.18.0.2", "198.51.100.7", 40000, 20000 + n) for n in range(FLOWS)]
# every announcement is a struct flow_key behind the ring's 8-byte header, padded to 8 bytes
RING_CAPACITY = MOVED_FLOWS_BYTES // ((RINGBUF_HEADER_BYTES + FLOW_KEY_DTYPE.itemsize + 7) // 8 * 8)


@pytest.fixture(scope="module")
def datapath() -> Iterator[Datapath]:
    with private_datapath(2 * RING_CAPACITY) as loaded:
        loaded.set_flow_share(4 * RING_CAPACITY)  # no overflow flow: every flow is its own
        yield loaded


@pytest.fixture
def program(datapath: Datapath) -> Iterator[Program]:
    with on_one_cpu():  # no two CPUs racing on a first packet: one announcement per flow and epoch
        yield Program(datapath.program_fd, skb_context(IFINDEX))


def ports(keys: np.ndarray | None) -> list[int]:
    assert keys is not None
    assert set(keys["ifindex"].tolist()) <= {IFINDEX}
    return sorted(keys["dst_port"].tolist())


def test_after_a_bump_exactly_the_flows_that_moved_are_announced_once(
    datapath: Datapath, program: Program
) -> None:
    for frame in FRAMES:
        program.run(frame)
    datapath.read_moved_keys()  # whatever an earlier epoch left
    assert ports(datapath.read_moved_keys()[0]) == []

    datapath.bump_epoch()
    bumped_at = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
    moved = (3, 41, 99)
    for n in moved:
        for _ in range(5):
            program.run(FRAMES[n])
    keys, lost = datapath.read_moved_keys()
    assert (ports(keys), lost) == ([20000 + n for n in moved], 0)
    assert ports(datapath.read_moved_keys()[0]) == []  # consumed: nothing twice

    read = datapath.lookup_flows(keys)
    assert sorted(read.keys["dst_port"].tolist()) == [20000 + n for n in moved]
    assert read.stats["packets"].tolist() == [6, 6, 6]  # the packet before the bump, then 5
    assert read.stats["bytes"].tolist() == [6 * ip_bytes(FRAMES[0])] * 3
    # stamped by the coarse clock: a little before the packets were sent, within the slack
    assert all(stamp >= bumped_at - COARSE_CLOCK_SLACK_NS for stamp in read.stats["last_seen_ns"].tolist())
    full = datapath.read_flows()
    assert len(full.keys) >= FLOWS

    datapath.bump_epoch()
    program.run(FRAMES[0])
    assert ports(datapath.read_moved_keys()[0]) == [20000]


def test_epoch_zero_announces_nothing(datapath: Datapath, program: Program) -> None:
    """Before any agent bumps the epoch, the ring stays empty: nobody would read it."""
    datapath.config.epoch = 0
    datapath.read_moved_keys()
    for n in range(FLOWS):
        program.run(udp_frame("198.18.0.9", "198.51.100.8", 40001, 30000 + n))
    assert ports(datapath.read_moved_keys()[0]) == []


def test_lost_announcements_are_reported_then_the_channel_recovers(
    datapath: Datapath, program: Program
) -> None:
    datapath.bump_epoch()
    datapath.read_moved_keys()
    sent = RING_CAPACITY + 1000
    before = datapath.moved_lost()
    for n in range(sent):  # distinct flows, nobody reading
        program.run(udp_frame("198.18.1.1", f"198.51.100.{n // 60000 + 10}", 40002, n % 60000 + 1, 8))
    assert datapath.moved_lost() - before == sent - RING_CAPACITY
    assert datapath.read_moved_keys() == (None, sent - RING_CAPACITY)  # a full read is due

    datapath.bump_epoch()
    for n in (7, 8):
        program.run(FRAMES[n])
    assert ports(datapath.read_moved_keys()[0]) == [20007, 20008]


def test_a_lookup_leaves_out_the_keys_the_table_no_longer_holds(datapath: Datapath, program: Program) -> None:
    """An announced flow the LRU evicted before the lookup: left out, the others read exactly."""
    wanted_ports = [20010, 20011, 20012]
    for port in wanted_ports:
        program.run(FRAMES[port - 20000])
    full = datapath.read_flows()
    ours = np.isin(full.keys["dst_port"], wanted_ports) & (full.keys["ifindex"] == IFINDEX)
    expected = dict(
        zip(full.keys["dst_port"][ours].tolist(), full.stats["packets"][ours].tolist(), strict=True)
    )
    assert sorted(expected) == wanted_ports and min(expected.values()) >= 1
    gone = full.keys[ours][:1].copy()
    gone["ifindex"] = 1 << 30  # no such device: never in the table
    read = datapath.lookup_flows(np.concatenate([gone, full.keys[ours], gone]))
    assert dict(zip(read.keys["dst_port"].tolist(), read.stats["packets"].tolist(), strict=True)) == expected
    assert datapath.lookup_flows(gone).keys.size == 0


def test_a_flow_that_moved_during_a_read_is_read_again_by_the_next(
    datapath: Datapath, program: Program, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A flow whose first packet of an epoch comes between the reader's bump and its drain is
    announced once, in the epoch the read is in: packets after that read stay unannounced
    until the next bump. The next read must look the flow up all the same, or a flow that
    stops there keeps its last packets out of every delta read."""
    frame = udp_frame("198.18.0.3", "198.51.100.7", 40003, 21000)
    program.run(frame)
    reader = FlowTableReader(datapath, run_dir=tmp_path)
    try:
        reader.read(full_read_wanted=False)  # the baseline: a full read
        bump = datapath.bump_epoch

        def bump_then_a_packet() -> int:
            epoch = bump()
            program.run(frame)  # the moment of the race: after the bump, before the drain
            return epoch

        monkeypatch.setattr(datapath, "bump_epoch", bump_then_a_packet)
        during = reader.read(full_read_wanted=False)
        monkeypatch.setattr(datapath, "bump_epoch", bump)
        program.run(frame)  # the flow's last packet: same epoch, after the read
        after = reader.read(full_read_wanted=False)
    finally:
        reader.close()
    assert (during.complete, after.complete) == (False, False)
    ours = [read.stats["packets"][read.keys["dst_port"] == 21000].tolist() for read in (during, after)]
    assert ours == [[2], [3]]
