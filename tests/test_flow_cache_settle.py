"""How a read adds the per-CPU flow cache to the flow table (agent/datapath/flow_cache.py),
against scripted cache reads and table lookups: the interleavings with a write-back that
a real race produces only now and then (tests/datapath/test_flow_cache.py races for real)."""

from __future__ import annotations

import numpy as np
import pytest

from agent.datapath import flow_cache
from agent.datapath.flow_cache import add_cached, keys_of, settle, totals
from agent.datapath.layouts import FLOW_CACHE_ENTRY_DTYPE, FLOW_KEY_DTYPE, FLOW_STATS_DTYPE


def entry(port: int, seq: int, packets: int, last_seen_ns: int = 100, rule_id: int = 0) -> np.void:
    e = np.zeros((), FLOW_CACHE_ENTRY_DTYPE)
    e["ifindex"], e["proto"], e["dst_port"], e["src_port"] = 9, 17, port, 4000
    e["src_addr"] = np.void(bytes([198, 18, 0, 2]))
    e["dst_addr"] = np.void(bytes([198, 51, 100, 7]))
    e["seq"], e["packets"], e["bytes"] = seq, packets, packets * 92
    e["first_seen_ns"], e["last_seen_ns"], e["rule_id"] = 50, last_seen_ns, rule_id
    return e


def cache_read(*entries: np.void) -> np.ndarray:
    return np.array(list(entries), FLOW_CACHE_ENTRY_DTYPE)


class ScriptedCache:
    """FlowCache.read() giving the scripted reads in turn, the last one again once they run out."""

    def __init__(self, *reads: np.ndarray) -> None:
        self.reads = list(reads)

    def read(self) -> np.ndarray:
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]


class ScriptedTable:
    """The table lookup: each call sees the table as it is by then (packets per port)."""

    def __init__(self, *states: dict[int, int]) -> None:
        self.states = list(states)
        self.calls = 0

    def lookup(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        state = self.states[min(self.calls, len(self.states) - 1)]
        self.calls += 1
        found = wanted[np.isin(wanted["dst_port"], list(state))]
        return found, table_stats([state[int(port)] for port in found["dst_port"]])


def table_stats(packets: list[int], last_seen_ns: int = 90) -> np.ndarray:
    stats = np.zeros(len(packets), FLOW_STATS_DTYPE)
    stats["packets"], stats["bytes"] = packets, [92 * p for p in packets]
    stats["first_seen_ns"], stats["last_seen_ns"] = 50, last_seen_ns
    return stats


def flow_key(port: int) -> np.ndarray:
    return keys_of(cache_read(entry(port, 0, 0)))


def packets(keys: np.ndarray, stats: np.ndarray) -> dict[int, int]:
    return dict(zip(keys["dst_port"].tolist(), stats["packets"].tolist(), strict=True))


@pytest.mark.parametrize("attempts", [0, flow_cache.SETTLE_ATTEMPTS])
def test_a_read_torn_by_a_write_back_is_read_again(monkeypatch: pytest.MonkeyPatch, attempts: int) -> None:
    """The first cache read took seq before the write-back began and the counts after it
    zeroed them; the table read came before the write-back added them: 10 + 0, where the
    flow had 15. Read again, it is 15; a reader that does not settle says 10."""
    monkeypatch.setattr(flow_cache, "SETTLE_ATTEMPTS", attempts)
    table = ScriptedTable({1: 15})
    cache = ScriptedCache(cache_read(entry(1, seq=4, packets=0)))
    keys, stats = settle(flow_key(1), table_stats([10]), cache_read(entry(1, 2, 0)), cache, table.lookup)
    assert packets(keys, stats) == {1: 15 if attempts else 10}


@pytest.mark.parametrize("attempts", [0, flow_cache.SETTLE_ATTEMPTS])
def test_counts_written_back_before_the_table_read_count_once(
    monkeypatch: pytest.MonkeyPatch, attempts: int
) -> None:
    """5 cached, then written back (the table 10 -> 15) before the table read: 15, not 20."""
    monkeypatch.setattr(flow_cache, "SETTLE_ATTEMPTS", attempts)
    table = ScriptedTable({1: 15})
    cache = ScriptedCache(cache_read(entry(1, seq=4, packets=0)))
    keys, stats = settle(flow_key(1), table_stats([15]), cache_read(entry(1, 2, 5)), cache, table.lookup)
    assert packets(keys, stats) == {1: 15 if attempts else 20}


def test_a_flow_that_keeps_moving_is_read_until_it_holds_still() -> None:
    """Written back during the first table read and again during the re-read: three reads."""
    table = ScriptedTable({1: 15}, {1: 18})
    cache = ScriptedCache(
        cache_read(entry(1, seq=4, packets=3)),  # after the first table read: moved
        cache_read(entry(1, seq=6, packets=1)),  # after the re-read: moved again
        cache_read(entry(1, seq=6, packets=2)),  # held still: the re-read's cache (1) counts
    )
    keys, stats = settle(flow_key(1), table_stats([10]), cache_read(entry(1, 2, 5)), cache, table.lookup)
    assert (packets(keys, stats), table.calls) == ({1: 19}, 2)


def test_only_the_flows_of_moved_ways_are_read_again_and_only_the_wanted_ones() -> None:
    table = ScriptedTable({1: 15, 2: 20, 3: 30})
    before = cache_read(entry(1, 2, 5), entry(2, 2, 4), entry(3, 2, 1))
    after = cache_read(entry(1, 4, 0), entry(2, 2, 6), entry(3, 4, 0))
    wanted = np.concatenate([flow_key(1), flow_key(2)])
    keys, stats = settle(wanted, table_stats([10, 20]), before, ScriptedCache(after), table.lookup, wanted)
    # 1 read again (15, cache 0); 2 held still: its table read and the cache read before it (4)
    assert (packets(keys, stats), table.calls) == ({1: 15, 2: 24}, 1)


def test_a_flow_cached_on_two_cpus_is_one_flow_with_the_latest_packets_fields() -> None:
    keys, stats = totals(
        cache_read(entry(5, 2, 3, last_seen_ns=300, rule_id=7), entry(5, 2, 4, last_seen_ns=200, rule_id=6))
    )
    assert (len(keys), int(stats["packets"][0]), int(stats["bytes"][0])) == (1, 7, 7 * 92)
    assert (int(stats["last_seen_ns"][0]), int(stats["rule_id"][0]), int(stats["first_seen_ns"][0])) == (
        300,
        7,
        50,
    )


def test_added_to_the_table_a_cached_flow_the_lru_evicted_stands_alone() -> None:
    cached_keys, cached_stats = totals(cache_read(entry(1, 2, 5, last_seen_ns=95), entry(2, 2, 1)))
    table = table_stats([10, 3], last_seen_ns=90)
    table["verdict"] = 1  # the table's last packet was dropped; the cache's (newer) was not
    keys, stats = add_cached(np.concatenate([flow_key(1), flow_key(3)]), table, cached_keys, cached_stats)
    assert packets(keys, stats) == {1: 15, 3: 3, 2: 1}
    by_port = dict(zip(keys["dst_port"].tolist(), stats, strict=True))
    assert (int(by_port[1]["verdict"]), int(by_port[1]["last_seen_ns"]), int(by_port[3]["verdict"])) == (
        0,
        95,
        1,
    )
    assert keys.dtype == FLOW_KEY_DTYPE and int(by_port[2]["first_seen_ns"]) == 50
