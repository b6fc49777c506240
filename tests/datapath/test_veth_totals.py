"""Each veth's totals, summed in numpy over its veth_counters slot copies and its
ifindex_counters entry (issue 11: one pass for every veth, no mask per veth): exact against
sums made here, on the real pinned maps of a private datapath."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from private_datapath import private_datapath, write_veth_slot

from agent.datapath import Datapath
from agent.datapath.layouts import VETH_COUNTERS_DTYPE
from agent.datapath.percpu import possible_cpus

pytestmark = pytest.mark.system

FIELDS = VETH_COUNTERS_DTYPE["counters"].shape[0]  # struct ifindex_counters as u64s


@pytest.fixture(scope="module")
def datapath() -> Iterator[Datapath]:
    with private_datapath(4096) as loaded:
        yield loaded


def test_slot_copies_and_hash_entries_of_every_veth_are_summed_exactly(datapath: Datapath) -> None:
    rng = np.random.default_rng(5)
    cpus = possible_cpus()
    expected: dict[int, np.ndarray] = {}
    for number in range(200):
        slot = np.zeros(cpus, VETH_COUNTERS_DTYPE)
        slot["ifindex"] = 1000 + number
        slot["counters"] = rng.integers(0, 1 << 40, (cpus, FIELDS))
        write_veth_slot(datapath, number * 5, slot.tobytes())
        expected[1000 + number] = slot["counters"].sum(axis=0)
    for ifindex in (1000, 1001, 5000, 5001):  # two that also hold a slot, two that hold none
        copies = rng.integers(0, 1 << 40, (cpus, FIELDS)).astype("<u8")
        datapath.ifindex_counters.update(ifindex.to_bytes(4, "little"), copies.tobytes())
        expected[ifindex] = expected.get(ifindex, 0) + copies.sum(axis=0)
    totals, counters = datapath.read_endpoint_totals(), datapath.read_ifindex_counters()
    assert sorted(totals) == sorted(counters) == sorted(expected)
    for ifindex, sums in expected.items():
        e = [int(value) for value in sums]
        got = totals[ifindex]
        assert (got.packets, got.bytes, got.overflow_packets, got.overflow_bytes) == (
            e[0],
            e[1],
            e[12],
            e[13],
        )
        # dropped: by a rule, unparsed with rules, held
        assert (got.dropped_packets, got.dropped_bytes) == (e[4] + e[8] + e[10], e[5] + e[9] + e[11])
        assert (counters[ifindex].non_ip_packets, counters[ifindex].held_bytes) == (e[2], e[11])
