"""Moved flows looked up in one syscall per LOOKUP_SLOTS keys (agent/datapath/flow_lookup.py)
give exactly what one BPF_MAP_LOOKUP_ELEM per key gives, on a real LRU flow table that has
evicted some of them; so does the one-syscall-per-key path kept for older kernels."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from private_datapath import private_datapath

from agent.datapath import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE, Datapath, flow_lookup
from agent.datapath.flow_lookup import LOOKUP_SLOTS
from agent.datapath.maps import Maps

pytestmark = pytest.mark.system

TABLE_SIZE = 2048
WRITTEN = 3000  # more than the table holds: the LRU evicts some
NEVER_WRITTEN = 100


@pytest.fixture(scope="module")
def datapath() -> Iterator[Datapath]:
    with private_datapath(TABLE_SIZE) as loaded:
        yield loaded


def flow_keys(count: int, proto: int) -> np.ndarray:
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    keys["ifindex"] = 7
    keys["family"] = 4
    keys["proto"] = proto
    keys["src_port"] = np.arange(count) // 1000
    keys["dst_port"] = np.arange(count) % 1000
    return keys


@pytest.fixture(scope="module")
def asked(datapath: Datapath) -> np.ndarray:
    """Keys in random order: WRITTEN written with distinct values, the LRU keeping only some,
    and NEVER_WRITTEN never written."""
    rng = np.random.default_rng(11)
    written = flow_keys(WRITTEN, proto=17)
    values = np.zeros(WRITTEN, FLOW_STATS_DTYPE)
    for field in ("bytes", "packets", "first_seen_ns", "last_seen_ns", "dropped_bytes", "dropped_packets"):
        values[field] = rng.integers(1, 1 << 62, WRITTEN, dtype=np.uint64)
    values["rule_id"] = np.arange(WRITTEN)
    values["epoch"] = 5
    for key, value in zip(written, values, strict=True):
        datapath.flows.update(key.tobytes(), value.tobytes())
    keys = np.concatenate([written, flow_keys(NEVER_WRITTEN, proto=6)])
    return keys[rng.permutation(len(keys))]


def one_by_one(datapath: Datapath, keys: np.ndarray) -> tuple[bytes, bytes]:
    """(keys found, their values) by a PinnedMap.lookup each, in the keys' order."""
    found = [(key.tobytes(), datapath.flows.lookup(key.tobytes())) for key in keys]
    return b"".join(key for key, value in found if value), b"".join(value for _, value in found if value)


def test_the_batched_lookup_gives_what_lookups_one_by_one_give(datapath: Datapath, asked: np.ndarray) -> None:
    expected_keys, expected_values = one_by_one(datapath, asked)
    held = len(expected_keys) // FLOW_KEY_DTYPE.itemsize
    assert LOOKUP_SLOTS < held < WRITTEN  # several runs, and the LRU evicted some
    lookup = flow_lookup.load(datapath.flows.fd, FLOW_KEY_DTYPE, FLOW_STATS_DTYPE)
    assert lookup is not None, "this kernel runs syscall programs (5.14+)"
    try:
        found, values = lookup.lookup(asked)
        assert (asked[found].tobytes(), values.tobytes()) == (expected_keys, expected_values)
        found, values = lookup.lookup(asked[:0])
        assert (len(found), len(values)) == (0, 0)
    finally:
        lookup.close()
    read = datapath.lookup_flows(asked)
    assert (read.keys.tobytes(), read.stats.tobytes()) == (expected_keys, expected_values)


def test_without_the_lookup_program_each_key_is_looked_up_alone(
    datapath: Datapath, asked: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads: list[int] = []
    monkeypatch.setattr(flow_lookup, "load", lambda fd, *_: loads.append(fd))  # None, as before 5.14
    maps = Maps(datapath.pin_dir)
    try:
        read = maps.lookup_flows(asked)
        maps.lookup_flows(asked[:1])
    finally:
        maps.close()
    assert len(loads) == 1  # asked once, then keys looked up one by one
    assert (read.keys.tobytes(), read.stats.tobytes()) == one_by_one(datapath, asked)
