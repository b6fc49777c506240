"""Reading only what moved gives the records a full read gives; container totals come from the
per-veth counters; the container and interval records say what the flows miss (pure logic:
tables are built here, the datapath side is tests/test_system_noisy_neighbour.py)."""

from __future__ import annotations

import io
import json
from importlib.resources import files
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np

from agent.datapath import FLOW_KEY_DTYPE, FLOW_STATS_DTYPE, EndpointTotals, FlowTableRead
from agent.datapath.maps import OVERFLOW_FAMILY, OVERFLOW_PROTO
from agent.export import SCHEMA_RESOURCES, container_record, flow_record, interval_record, write_ndjson
from agent.flows import FlowAggregator, TableRead
from agent.model import Container, Endpoint, Inventory, Snapshot
from agent.plain import header
from agent.table_reader import FlowTableReader

WEB = Container(id="a" * 64, name="web", image="nginx", endpoints=(Endpoint(10, "vethweb", "front", "br0"),))
NOISY = Container(
    id="b" * 64, name="noisy", image="x", endpoints=(Endpoint(11, "vethnoisy", "front", "br0"),)
)
INVENTORY = Inventory(containers=(WEB, NOISY))
TABLE_SIZE = 1024
SECOND = 10**9
VALIDATORS = {
    kind: jsonschema.Draft202012Validator(json.loads((files("agent.schema") / name).read_text()))
    for kind, name in SCHEMA_RESOURCES.items()
}

# flow: (ifindex, family, proto, src_port, dst_port) -> (bytes, packets, last_seen_ns)
Flows = dict[tuple[int, int, int, int, int], tuple[int, int, int]]


def arrays(flows: Flows) -> tuple[np.ndarray, np.ndarray]:
    keys = np.zeros(len(flows), FLOW_KEY_DTYPE)
    stats = np.zeros(len(flows), FLOW_STATS_DTYPE)
    for row, ((ifindex, family, proto, sport, dport), (nbytes, packets, last_seen)) in enumerate(
        flows.items()
    ):
        keys[row] = (
            ifindex,
            family,
            proto,
            sport,
            dport,
            0,
            bytes([10, 0, 0, 2]).ljust(16, b"\0"),
            b"\0" * 16,
        )
        if family == 4:
            keys["dst_addr"][row] = bytes([198, 51, 100, dport % 256]).ljust(16, b"\0")
        stats["bytes"][row], stats["packets"][row], stats["last_seen_ns"][row] = nbytes, packets, last_seen
        stats["first_seen_ns"][row] = SECOND
    return keys, stats


def totals(**per_veth: tuple[int, int, int]) -> dict[int, EndpointTotals]:
    """veth10=(packets, bytes, overflow packets) -> exact per-veth totals."""
    return {
        int(name.removeprefix("veth")): EndpointTotals(packets, nbytes, 0, 0, overflow, overflow * 92)
        for name, (packets, nbytes, overflow) in per_veth.items()
    }


def table_read(
    flows: Flows, at: int, veths: dict[int, EndpointTotals], created: int, size: int = TABLE_SIZE, **kw: Any
) -> TableRead:
    keys, stats = arrays(flows)
    started = at * SECOND - 1000
    return TableRead(
        keys, stats, at * SECOND, size, created, read_started_ns=started, endpoint_totals=veths, **kw
    )


def comparable(snapshot: Snapshot) -> list[dict[str, Any]]:
    """Every record of the interval but the wall-clock time of the refresh."""
    records = [flow_record(f, snapshot) for f in snapshot.flows]
    records += [container_record(s, snapshot) for s in snapshot.stats]
    records.append(interval_record(snapshot))
    for record in records:
        VALIDATORS[record["type"]].validate(record)
        for wall_clock in ("time", "first_seen", "last_seen"):  # each aggregator's own clock offset
            record.pop(wall_clock, None)
        record.pop("full_reads", None)  # the one field that tells the two paths apart
    return records


WEB_FLOW, WEB_DNS, NOISY_FLOW = (10, 4, 17, 40000, 7), (10, 4, 17, 40001, 53), (11, 4, 17, 50000, 9)
OVERFLOW = (11, OVERFLOW_FAMILY, OVERFLOW_PROTO, 0, 0)
# Four refreshes of a 3-entry table: a baseline; web moves; a new flow and the overflow flow
# fill the table (web is idle); the web flow is evicted and created again, its counter smaller.
SMALL_TABLE = 3
SEQUENCE: list[tuple[Flows, dict[int, EndpointTotals], int]] = [
    ({WEB_FLOW: (920, 10, 1 * SECOND)}, totals(veth10=(10, 920, 0)), 1),
    ({WEB_FLOW: (1840, 20, 2 * SECOND)}, totals(veth10=(20, 1840, 0)), 1),
    (
        {WEB_FLOW: (1840, 20, 2 * SECOND), NOISY_FLOW: (92, 1, 3 * SECOND), OVERFLOW: (920, 10, 3 * SECOND)},
        totals(veth10=(20, 1840, 0), veth11=(11, 1012, 10)),
        3,
    ),
    (
        {WEB_FLOW: (184, 2, 4 * SECOND), NOISY_FLOW: (92, 1, 3 * SECOND), OVERFLOW: (920, 10, 3 * SECOND)},
        totals(veth10=(25, 2300, 0), veth11=(11, 1012, 10)),
        4,
    ),
]


def moved_only(previous: Flows, current: Flows) -> Flows:
    """What the ring buffer announces: the flows whose counters changed since the last read."""
    return {key: value for key, value in current.items() if previous.get(key) != value}


def test_reading_only_the_moved_flows_gives_the_records_of_a_full_read() -> None:
    full, partial = FlowAggregator(), FlowAggregator()
    previous: Flows = {}
    for at, (flows, veths, created) in enumerate(SEQUENCE, start=1):
        whole = full.update(table_read(flows, at, veths, created, SMALL_TABLE), INVENTORY)
        complete = partial.full_read_wanted
        announced = flows if complete else moved_only(previous, flows)
        moved = partial.update(
            table_read(announced, at, veths, created, SMALL_TABLE, complete=complete), INVENTORY
        )
        assert comparable(moved) == comparable(whole), f"refresh {at}"
        assert moved.losses.full_read is complete is (at == 1)
        previous = flows
    # the last refresh, read both ways: the evicted-and-recreated web flow and exact totals
    web = next(s for s in whole.stats if s.container is WEB)
    assert (web.packets_delta, web.bytes_delta, web.packets_total) == (5, 460, 25)
    assert [(f.key.dst_port, f.packets_delta) for f in whole.flows] == [(7, 2)]
    assert (whole.losses.restarted_flows, whole.losses.evicted, whole.table.used) == (1, 1, 3)


def test_container_totals_are_the_veth_counters_not_the_sum_of_flows() -> None:
    """The flow table lost most of web's packets (evicted flows); its row does not."""
    aggregator = FlowAggregator()
    aggregator.update(table_read({}, 1, totals(veth10=(0, 0, 0)), 0), INVENTORY)
    snapshot = aggregator.update(
        table_read({WEB_FLOW: (92, 1, 2 * SECOND)}, 2, totals(veth10=(1000, 92000, 0)), 900), INVENTORY
    )
    web = next(s for s in snapshot.stats if s.container is WEB)
    assert (web.packets_delta, web.bytes_delta, web.packets_total, web.bytes_total) == (
        1000,
        92000,
        1000,
        92000,
    )
    assert sum(f.packets_delta for f in snapshot.flows) == 1  # the flows saw one packet of them
    assert snapshot.table.evicted == 899 and snapshot.losses.evicted == 899


def test_the_overflow_flow_is_no_flow_record_but_the_containers_overflow() -> None:
    aggregator = FlowAggregator()
    aggregator.update(table_read({}, 1, totals(veth11=(0, 0, 0)), 0), INVENTORY)
    snapshot = aggregator.update(
        table_read({OVERFLOW: (920, 10, 2 * SECOND)}, 2, totals(veth11=(10, 920, 10)), 1), INVENTORY
    )
    assert snapshot.flows == []
    assert snapshot.overflow_packets == {"noisy": 10}
    record = interval_record(snapshot)
    assert (record["overflow_packets"], record["containers_overflowing"]) == (10, 1)
    assert "LOSS this interval: overflow noisy 10p" in header(snapshot, "host")


def test_the_stream_is_flows_then_containers_then_one_interval_record() -> None:
    aggregator = FlowAggregator()
    aggregator.update(table_read({}, 1, totals(veth10=(0, 0, 0), veth11=(0, 0, 0)), 0), INVENTORY)
    snapshot = aggregator.update(
        table_read(
            {WEB_FLOW: (920, 10, 2 * SECOND)},
            2,
            totals(veth10=(10, 920, 0), veth11=(0, 0, 0)),
            1,
            moved_lost=3,
        ),
        INVENTORY,
    )
    out = io.StringIO()
    assert write_ndjson(snapshot, out) == 1
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    for record in records:
        VALIDATORS[record["type"]].validate(record)
    assert [r["type"] for r in records] == ["flow", "container", "interval"]  # idle noisy: no record
    assert (records[1]["container_name"], records[1]["packets_delta"], records[1]["bytes"]) == (
        "web",
        10,
        920,
    )
    interval = records[2]
    assert (interval["moved_events_lost"], interval["flow_table_used"], interval["flow_table_size"]) == (
        3,
        1,
        1024,
    )
    assert "3 events lost" in header(snapshot, "host")
    filtered = io.StringIO()
    write_ndjson(snapshot, filtered, {NOISY.id})
    assert [json.loads(line)["type"] for line in filtered.getvalue().splitlines()] == ["interval"]


def test_the_header_says_nothing_of_loss_when_nothing_is_lost() -> None:
    aggregator = FlowAggregator()
    aggregator.update(table_read({}, 1, totals(veth10=(0, 0, 0)), 0), INVENTORY)
    snapshot = aggregator.update(
        table_read({WEB_FLOW: (92, 1, 2 * SECOND)}, 2, totals(veth10=(1, 92, 0)), 1), INVENTORY
    )
    assert "LOSS" not in header(snapshot, "host")


def test_a_full_read_is_wanted_first_and_when_evicted_keys_must_be_forgotten() -> None:
    aggregator = FlowAggregator()
    assert aggregator.full_read_wanted
    aggregator.update(table_read({}, 1, {}, 0), INVENTORY)
    assert not aggregator.full_read_wanted
    churn = {(10, 4, 17, port, 7): (92, 1, 2 * SECOND) for port in range(9000)}  # past 2 x 4,096 keys
    aggregator.update(table_read(churn, 2, {}, 9000, complete=False), INVENTORY)
    assert aggregator.full_read_wanted
    aggregator.update(table_read(dict(list(churn.items())[:10]), 3, {}, 9000), INVENTORY)
    assert not aggregator.full_read_wanted  # the complete read let the evicted keys go


class RecordingMaps:
    """Stands in for agent.datapath.Maps (pure logic): records which reads the reader made."""

    flow_table_size = TABLE_SIZE

    def __init__(self, announced: list[tuple[np.ndarray | None, int]]):
        self.announced = announced
        self.calls: list[str] = []
        self.epoch = 0

    def bump_epoch(self) -> int:
        self.epoch += 1
        return self.epoch

    def read_moved_keys(self) -> tuple[np.ndarray | None, int]:
        return self.announced.pop(0)

    def read_flows(self) -> FlowTableRead:
        self.calls.append("full")
        return FlowTableRead(*arrays({WEB_FLOW: (92, 1, SECOND)}), 2 * SECOND, SECOND)

    def lookup_flows(self, keys: np.ndarray) -> FlowTableRead:
        self.calls.append(f"lookup {len(keys)}")
        return FlowTableRead(keys, np.zeros(len(keys), FLOW_STATS_DTYPE), 2 * SECOND, SECOND)

    def flows_created(self) -> int:
        return 1

    def read_endpoint_totals(self) -> dict[int, EndpointTotals]:
        return totals(veth10=(1, 92, 0))


def test_the_reader_reads_the_whole_table_first_after_lost_events_and_when_asked(tmp_path: Path) -> None:
    one_key = arrays({WEB_FLOW: (92, 1, SECOND)})[0]
    maps = RecordingMaps([(one_key, 0), (one_key, 0), (None, 5), (one_key, 0), (one_key, 0)])
    reader = FlowTableReader(maps, run_dir=tmp_path)  # type: ignore[arg-type]
    try:
        reads = [reader.read(full_read_wanted=wanted) for wanted in (False, False, False, True, False)]
    finally:
        reader.close()
    assert maps.calls == ["full", "lookup 1", "full", "full", "lookup 1"]
    assert [(r.complete, r.moved_lost) for r in reads] == [
        (True, 0),
        (False, 0),
        (True, 5),
        (True, 0),
        (False, 0),
    ]
    assert maps.epoch == 5  # once per refresh: the flow share is per epoch


def test_only_one_reader_consumes_the_moved_flows_others_read_the_whole_table(tmp_path: Path) -> None:
    one_key = arrays({WEB_FLOW: (92, 1, SECOND)})[0]
    consumer_maps, other_maps = RecordingMaps([(one_key, 0)] * 2), RecordingMaps([])
    consumer = FlowTableReader(consumer_maps, run_dir=tmp_path)  # type: ignore[arg-type]
    other = FlowTableReader(other_maps, run_dir=tmp_path)  # type: ignore[arg-type]
    try:
        assert (consumer.reads_moved_keys, other.reads_moved_keys) == (True, False)
        for _ in range(2):
            consumer.read(full_read_wanted=False)
            other.read(full_read_wanted=False)
    finally:
        consumer.close()
        other.close()
    assert (consumer_maps.calls, other_maps.calls) == (["full", "lookup 1"], ["full", "full"])
    assert other_maps.epoch == 2  # it bumps the epoch all the same
    after = FlowTableReader(RecordingMaps([]), run_dir=tmp_path)  # type: ignore[arg-type]
    assert after.reads_moved_keys  # the consumer's lock went with it
    after.close()


def test_an_aggregator_without_flows_gives_the_same_container_rows() -> None:
    """The agent without export or metrics builds no Flow objects: its rows are the same."""
    with_flows, without = FlowAggregator(), FlowAggregator(build_flows=False)
    for at, (flows, veths, created) in enumerate(SEQUENCE, start=1):
        full = with_flows.update(table_read(flows, at, veths, created), INVENTORY)
        lean = without.update(table_read(flows, at, veths, created), INVENTORY)
        assert lean.flows == []
        rows = [container_record(s, lean) for s in lean.stats]
        assert [r | {"time": 0} for r in rows] == [
            container_record(s, full) | {"time": 0} for s in full.stats
        ], f"refresh {at}"


def test_veth_totals_of_a_container_are_summed_and_a_reused_slot_never_goes_negative() -> None:
    """Two veths of one container, one (of no container) unknown to the inventory, and veths
    whose counters restart below their last value (the slot was reused): the delta is then
    the new count, as for a veth first seen this interval."""
    two_legs = Container(
        id="c" * 64,
        name="router",
        image="x",
        endpoints=(Endpoint(20, "veth20", "front", "br0"), Endpoint(21, "veth21", "back", "br0")),
    )
    inventory = Inventory(containers=(WEB, two_legs))
    sequence = [
        totals(veth10=(5, 500, 0), veth20=(10, 1000, 0), veth99=(7, 700, 0)),
        totals(veth10=(8, 800, 1), veth20=(12, 1200, 0), veth21=(3, 300, 2), veth99=(9, 900, 0)),
        totals(veth10=(2, 200, 0), veth20=(15, 1500, 0), veth21=(4, 400, 2)),
    ]
    aggregator = FlowAggregator(build_flows=False)
    rows = []
    for at, veths in enumerate(sequence, start=1):
        snapshot = aggregator.update(table_read({}, at, veths, 0, complete=at == 1), inventory)
        rows.append(
            {
                s.container.name: (
                    s.packets_total,
                    s.bytes_total,
                    s.packets_delta,
                    s.bytes_delta,
                    s.overflow_packets_delta,
                )
                for s in snapshot.stats
            }
        )
    assert rows == [
        {"web": (5, 500, 0, 0, 0), "router": (10, 1000, 0, 0, 0)},  # the baseline
        {"web": (8, 800, 3, 300, 1), "router": (15, 1500, 5, 500, 2)},  # veth21 new: all of it
        {"web": (2, 200, 2, 200, 0), "router": (19, 1900, 4, 400, 0)},  # veth10 restarted
    ]
