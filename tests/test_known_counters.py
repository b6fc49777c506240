"""KnownCounters against a dict of whole keys: the narrow (IPv4) and wide tables together
must remember exactly what a dict would, whatever mix of keys comes."""

from __future__ import annotations

import numpy as np

from agent.datapath import FLOW_KEY_DTYPE
from agent.known_counters import KnownCounters


def random_keys(rng: np.random.Generator, count: int) -> np.ndarray:
    """Keys that differ in every byte the datapath may set: IPv4 ones, IPv6 ones, and
    'IPv4' ones with stray bytes in the pad or past the 4 address bytes (kept whole)."""
    keys = np.zeros(count, FLOW_KEY_DTYPE)
    keys["ifindex"] = rng.integers(1, 4, count)
    keys["family"] = rng.choice([4, 6], count)
    keys["proto"] = rng.choice([6, 17], count)
    keys["src_port"] = rng.integers(0, 3, count)
    keys["dst_port"] = rng.integers(0, 3, count)
    raw = keys.view(np.uint8).reshape(count, FLOW_KEY_DTYPE.itemsize)
    src, dst = FLOW_KEY_DTYPE.fields["src_addr"][1], FLOW_KEY_DTYPE.fields["dst_addr"][1]
    raw[:, src : src + 4] = rng.integers(0, 2, (count, 4))
    raw[:, dst : dst + 4] = rng.integers(0, 2, (count, 4))
    ipv6 = keys["family"] == 6
    raw[ipv6, src + 4 : src + 16] = rng.integers(0, 2, (int(ipv6.sum()), 12))
    stray = rng.random(count) < 0.05
    raw[stray, rng.integers(10, FLOW_KEY_DTYPE.itemsize, int(stray.sum()))] = 1
    return np.unique(keys.view("V44")).view(FLOW_KEY_DTYPE)


def test_exchange_and_forgetting_match_a_dict_of_whole_keys() -> None:
    rng = np.random.default_rng(11)
    known, reference = KnownCounters(), {}
    universe = random_keys(rng, 6000)
    assert len(universe) > 2000
    first = universe[rng.random(len(universe)) < 0.3]
    counters = rng.integers(0, 1 << 40, (len(first), 3))
    known.reset(first, counters)
    reference = {key.tobytes(): row.tolist() for key, row in zip(first, counters, strict=True)}
    for _ in range(30):
        keys = universe[rng.random(len(universe)) < 0.1]
        now = rng.integers(0, 1 << 40, (len(keys), 3))
        before = known.exchange(keys, now)
        expected = [reference.get(key.tobytes(), [0, 0, 0]) for key in keys]
        assert before.tolist() == expected
        reference |= {key.tobytes(): row.tolist() for key, row in zip(keys, now, strict=True)}
        assert len(known) == len(reference)
        if rng.random() < 0.2:
            keep = universe[rng.random(len(universe)) < 0.5]
            known.keep_only(keep)
            kept = {key.tobytes() for key in keep}
            reference = {key: row for key, row in reference.items() if key in kept}
            assert len(known) == len(reference)


def test_an_ipv4_flow_costs_18_key_bytes_and_its_counters() -> None:
    keys = np.zeros(1000, FLOW_KEY_DTYPE)
    keys["ifindex"], keys["family"], keys["src_port"] = 7, 4, np.arange(1000)
    known = KnownCounters()
    known.reset(keys, np.ones((1000, 3), np.int64))
    assert known.nbytes == 1000 * (18 + 3 * 8)
    assert known.exchange(keys[:2], np.full((2, 3), 5)).tolist() == [[1, 1, 1], [1, 1, 1]]
