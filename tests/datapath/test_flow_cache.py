"""The per-CPU flow cache in front of the flow table (struct flow_cache_set, bpf/egress_maps.h;
agent/datapath/flow_cache.py): reads add it to the table exactly, through evictions,
epoch write-backs and a reader racing them.

The compiled datapath (private pins) runs by BPF_PROG_TEST_RUN on the loopback device.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
from private_datapath import ip_bytes, on_one_cpu, private_datapath, udp_frame, write_veth_slot
from prog_run import TC_ACT_SHOT, TC_ACT_UNSPEC, Program, skb_context

from agent.datapath import Datapath, flow_cache
from agent.datapath.layouts import VETH_COUNTERS_DTYPE
from agent.datapath.maps import VETH_COUNTER_SLOTS
from agent.datapath.percpu import possible_cpus
from agent.policy import Rule, lpm_entries

pytestmark = pytest.mark.system

IFINDEX = 1  # the loopback device
TABLE_SIZE = 65536


@pytest.fixture(scope="module")
def datapath() -> Iterator[Datapath]:
    with private_datapath(TABLE_SIZE) as loaded:
        loaded.set_flow_share(TABLE_SIZE)  # no overflow flow: every flow is its own
        yield loaded


def frames(count: int, src: str) -> list[bytes]:
    return [udp_frame(src, f"198.51.100.{n // 50000 + 1}", 40000, n % 50000 + 1) for n in range(count)]


def packets_by_port(datapath: Datapath, src: str) -> dict[tuple[bytes, int], int]:
    """Packets of each flow from `src`: (destination address, port) -> packets."""
    read = datapath.read_flows()
    sources = np.ascontiguousarray(read.keys["src_addr"]).view(np.uint8).reshape(-1, 16)[:, :4]
    ours = np.flatnonzero((sources == np.frombuffer(bytes(map(int, src.split("."))), np.uint8)).all(axis=1))
    return {
        (bytes(read.keys["dst_addr"][row])[:4], int(read.keys["dst_port"][row])): int(
            read.stats["packets"][row]
        )
        for row in ours.tolist()
    }


def cache_entries(datapath: Datapath) -> int:
    entries = flow_cache.FlowCache(datapath.flow_cache).read()
    return int(np.count_nonzero(entries["ifindex"]))


def test_more_flows_than_the_cache_holds_are_counted_exactly(datapath: Datapath) -> None:
    """Three times as many flows as one CPU's cache holds, sent round-robin: every packet is
    either in the table or in a cache entry, and the read adds them once."""
    cache = flow_cache.FlowCache(datapath.flow_cache)
    flows = 3 * cache.sets * cache.ways
    sent = frames(flows, "198.18.3.1")
    with on_one_cpu():
        program = Program(datapath.program_fd, skb_context(IFINDEX))
        for _ in range(4):
            for frame in sent:
                program.run(frame)
    counted = packets_by_port(datapath, "198.18.3.1")
    assert len(counted) == flows
    assert set(counted.values()) == {4}
    assert cache_entries(datapath) == cache.sets * cache.ways  # every way of that CPU took a flow


def test_a_cached_flow_is_counted_in_its_entry_and_written_back_on_a_new_epoch(datapath: Datapath) -> None:
    """Hits stay in the cache (the table keeps the miss), the first packet of an epoch writes
    them back and announces the flow."""
    frame = udp_frame("198.18.4.1", "198.51.100.9", 40000, 60007)
    with on_one_cpu():
        program = Program(datapath.program_fd, skb_context(IFINDEX))
        datapath.bump_epoch()
        for _ in range(10):
            program.run(frame)
        key = datapath.read_flows()
        (row,) = np.flatnonzero(key.keys["dst_port"] == 60007)
        table_only = datapath._lookup_table(key.keys[row : row + 1])[1]
        assert (int(table_only["packets"][0]), int(key.stats["packets"][row])) == (1, 10)
        datapath.read_moved_keys()
        datapath.bump_epoch()
        program.run(frame)
        moved, lost = datapath.read_moved_keys()
        table_only = datapath._lookup_table(key.keys[row : row + 1])[1]
    assert (lost, moved is not None and 60007 in moved["dst_port"].tolist()) == (0, True)
    assert int(table_only["packets"][0]) == 11  # written back, this packet with them
    assert int(table_only["bytes"][0]) == 11 * ip_bytes(frame)


def test_reads_racing_write_backs_never_go_back_or_count_twice(
    datapath: Datapath, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert races_seen(datapath, "198.18.5.1") == (0, 0)


def test_without_settling_the_same_race_is_seen(datapath: Datapath, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above can fail: with reads that never read a moved way again it does."""
    monkeypatch.setattr(flow_cache, "SETTLE_ATTEMPTS", 0)
    assert races_seen(datapath, "198.18.6.1") != (0, 0)


RACE_FLOWS = 4096  # twice one CPU's cache: evictions all the time
BURST = 4  # packets of a flow in a row: a flow counts hits in the cache before it is evicted
RACE_SECONDS = 4.0


def races_seen(datapath: Datapath, src: str) -> tuple[int, int]:
    """(went back, ahead): a sender on one CPU runs RACE_FLOWS flows round-robin, BURST
    packets each, so that evicted flows write back what they counted, while a reader on
    another bumps the epoch (every cached flow writes back on its next packet) and reads the
    whole table. Counts any flow whose total fell from one read to the next, and any read
    total greater than what was sent before the read ended."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("a race between CPUs needs two")
    sent = [frame for frame in frames(RACE_FLOWS, src) for _ in range(BURST)]
    rounds_done = [0]
    stop = threading.Event()

    def send() -> None:
        os.sched_setaffinity(0, {cpus[0]})
        program = Program(datapath.program_fd, skb_context(IFINDEX))
        deadline = time.monotonic() + RACE_SECONDS + 30
        while not stop.is_set() and time.monotonic() < deadline:
            for frame in sent:
                program.run(frame)
            rounds_done[0] += 1

    sender = threading.Thread(target=send)
    os.sched_setaffinity(0, {cpus[1]})
    went_back = ahead = 0
    try:
        sender.start()
        previous: dict[tuple[bytes, int], int] = {}
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            datapath.bump_epoch()
            counted = packets_by_port(datapath, src)
            ceiling = BURST * (rounds_done[0] + 1)  # each flow has had at most this many packets
            ahead += sum(1 for packets in counted.values() if packets > ceiling)
            went_back += sum(1 for flow, packets in counted.items() if packets < previous.get(flow, 0))
            previous = counted
    finally:
        stop.set()
        sender.join()
        os.sched_setaffinity(0, set(cpus))
    final = packets_by_port(datapath, src)
    assert len(final) == RACE_FLOWS
    assert set(final.values()) == {BURST * rounds_done[0]}  # exact once it stops (it stops between rounds)
    return went_back, ahead


SLOT = 7


def rule(rule_id: int, dest: str, action: str) -> Rule:
    return Rule(rule_id, "web", dest, "cidr", None, "any", action, "2026-12-01T00:00:00Z", (dest,))


@pytest.mark.parametrize("generation_bumped", [True, False])
def test_a_cached_verdict_gives_way_to_a_block_written_after_it(
    datapath: Datapath, monkeypatch: pytest.MonkeyPatch, generation_bumped: bool
) -> None:
    """A flow forwarded by an allow rule is cached with its verdict; a block written for it
    drops its very next packet, because the write changes the generation the verdict was
    cached under. Without that change (the control) the cached verdict would still pass it."""
    if not generation_bumped:
        monkeypatch.setattr(datapath, "_endpoints_changed", lambda: None)
    frame = udp_frame("198.18.7.1", "198.51.100.77", 40000, 9444 if generation_bumped else 9445)
    with on_one_cpu():
        program = Program(datapath.program_fd, skb_context(IFINDEX))
        datapath.set_endpoint(IFINDEX, SLOT, has_policy=True)
        allow, block = rule(1, "198.51.100.0/24", "allow"), rule(2, "198.51.100.77/32", "block")
        try:
            datapath.sync_policy(
                (entry.key_bytes(), entry.value_bytes()) for entry in lpm_entries([allow], {"web": SLOT})
            )
            assert [program.run(frame) for _ in range(3)] == [TC_ACT_UNSPEC] * 3  # cached, by rule 1
            datapath.sync_policy(
                (entry.key_bytes(), entry.value_bytes())
                for entry in lpm_entries([allow, block], {"web": SLOT})
            )
            verdict = program.run(frame)
        finally:
            monkeypatch.undo()
            datapath.sync_policy([])
            datapath.forget_endpoints(keep=())
    assert verdict == (TC_ACT_SHOT if generation_bumped else TC_ACT_UNSPEC)


@pytest.mark.parametrize("generation_bumped", [True, False])
def test_holding_unknown_veths_voids_the_verdicts_cached_before(
    datapath: Datapath, monkeypatch: pytest.MonkeyPatch, generation_bumped: bool
) -> None:
    """A cached hit is counted before the endpoint is looked up, so the hold on unknown veths
    is not checked for it: turning the hold on must void the verdicts cached without it.
    With the new generation the unknown veth's next packet is held; without it (the
    control) the cached verdict would still pass it."""
    if not generation_bumped:
        monkeypatch.setattr(datapath, "_endpoints_changed", lambda: None)
    frame = udp_frame("198.18.8.1", "198.51.100.78", 40000, 9446 if generation_bumped else 9447)
    datapath.forget_endpoints(keep=())
    with on_one_cpu():
        program = Program(datapath.program_fd, skb_context(IFINDEX))
        try:
            assert [program.run(frame) for _ in range(3)] == [TC_ACT_UNSPEC] * 3  # cached: no hold yet
            datapath.set_hold_unknown(True)
            verdict = program.run(frame)
        finally:
            monkeypatch.undo()
            datapath.set_hold_unknown(False)
    assert verdict == (TC_ACT_SHOT if generation_bumped else TC_ACT_UNSPEC)


OTHER_IFINDEX = IFINDEX + VETH_COUNTER_SLOTS  # the same veth_counters slot


def test_cached_hits_of_a_veth_whose_slot_another_holds_count_in_its_own_totals(datapath: Datapath) -> None:
    """The fast path counts a hit in the veth's veth_counters slot only when the veth holds
    it: here another live veth holds it on every CPU, and every packet of the cached flow
    still lands in this veth's totals (through counters_of's hash entry), none in the other's."""
    frame = udp_frame("198.18.9.1", "198.51.100.79", 40000, 9448)
    claimant = np.zeros(possible_cpus(), VETH_COUNTERS_DTYPE)
    claimant["ifindex"] = OTHER_IFINDEX
    datapath.set_endpoint(OTHER_IFINDEX, SLOT, has_policy=False)  # live: its slot is not taken over
    write_veth_slot(datapath, IFINDEX, claimant.tobytes())
    try:
        with on_one_cpu():
            program = Program(datapath.program_fd, skb_context(IFINDEX))
            program.run(frame)  # the table path caches the flow
            before = datapath.read_endpoint_totals()[IFINDEX]
            for _ in range(20):
                program.run(frame)
        totals = datapath.read_endpoint_totals()
        assert (totals[IFINDEX].packets - before.packets, totals[IFINDEX].bytes - before.bytes) == (
            20,
            20 * ip_bytes(frame),
        )
        assert (totals[OTHER_IFINDEX].packets, totals[OTHER_IFINDEX].bytes) == (0, 0)
        assert packets_by_port(datapath, "198.18.9.1") == {(bytes([198, 51, 100, 79]), 9448): 21}
    finally:
        write_veth_slot(datapath, IFINDEX, b"")
        datapath.forget_endpoints(keep=())
