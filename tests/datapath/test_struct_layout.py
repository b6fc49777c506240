"""The Python mirrors of bpf/egress_maps.h against the layouts the C compiler gives.

Sizes, offsets and constants come from compiling the real header (c_layout); only
field *names* are written here. A field added, moved or resized on one side alone
fails one of these tests.
"""

from __future__ import annotations

import ctypes
import ipaddress
import json
import re
import struct
import sys
from dataclasses import fields
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
from c_layout import c_values

from agent.datapath import flow_maps, maps, policy_maps
from agent.model import Verdict
from agent.policy import (
    POLICY_ALLOW,
    POLICY_DROP,
    POLICY_KEY_FIXED_BITS,
    Rule,
    lpm_entries,
)
from agent.policy.compile import POLICY_LPM_KEY_STRUCT, POLICY_RULE_STRUCT

NUMPY_MIRRORS = {
    "flow_key": maps.FLOW_KEY_DTYPE,
    "flow_stats": maps.FLOW_STATS_DTYPE,
    "flow_cache_entry": maps.FLOW_CACHE_ENTRY_DTYPE,
    "veth_counters": maps.VETH_COUNTERS_DTYPE,
}
# struct.Struct mirrors: C field names in the order of the format's items
STRUCT_MIRRORS: dict[str, tuple[struct.Struct, tuple[str, ...]]] = {
    "endpoint_info": (policy_maps._ENDPOINT, ("slot", "flags")),
    "ifindex_counters": (
        maps._IFINDEX_COUNTERS,
        (
            "packets",  # the totals, read into maps.EndpointTotals
            "bytes",
            *(field.name for field in fields(maps.IfindexCounters)),
            "overflow_packets",
            "overflow_bytes",
        ),
    ),
    "rule_stats": (policy_maps._RULE_STATS, ("packets", "bytes", "last_hit_ns")),
    "policy_lpm_key": (POLICY_LPM_KEY_STRUCT, ("prefixlen", "slot", "proto", "family", "port", "addr")),
    "policy_rule": (POLICY_RULE_STRUCT, ("rule_id", "action", "addr_prefixlen", "pad")),
}
CONSTANTS = {
    "EGRESS_TOP_LAYOUT": maps.LAYOUT_VERSION,
    "ENDPOINT_F_POLICY": policy_maps.ENDPOINT_F_POLICY,
    "CONFIG_F_HOLD_UNKNOWN": policy_maps.CONFIG_F_HOLD_UNKNOWN,
    "POLICY_KEY_FIXED_BITS": POLICY_KEY_FIXED_BITS,
    "POLICY_ALLOW": POLICY_ALLOW,
    "POLICY_DROP": POLICY_DROP,
    "STAT_FLOWS_CREATED": flow_maps.STAT_FLOWS_CREATED,
    "STAT_MOVED_LOST": flow_maps.STAT_MOVED_LOST,
    "RULE_KIND_PORT": policy_maps.RULE_KIND_PORT,
    "RULE_KIND_PROTO": policy_maps.RULE_KIND_PROTO,
    "RULE_KIND_ANY": policy_maps.RULE_KIND_ANY,
    "OVERFLOW_FAMILY": maps.OVERFLOW_FAMILY,
    "OVERFLOW_PROTO": maps.OVERFLOW_PROTO,
    "VETH_COUNTER_SLOTS": maps.VETH_COUNTER_SLOTS,
    "MOVED_FLOWS_BYTES": flow_maps.MOVED_FLOWS_BYTES,
    "VERDICT_FORWARDED": list(Verdict).index(Verdict.FORWARDED),
    "VERDICT_DROPPED": list(Verdict).index(Verdict.DROPPED),
    "VERDICT_DROPPED_UNPARSED": list(Verdict).index(Verdict.DROPPED_UNPARSED),
    "VERDICT_HELD": list(Verdict).index(Verdict.HELD),
}


def _layout(name: str, field_names: tuple[str, ...]) -> dict[str, int]:
    expressions = [f"sizeof(struct {name})"]
    for field_name in field_names:
        expressions += [
            f"offsetof(struct {name}, {field_name})",
            f"sizeof(((struct {name} *)0)->{field_name})",
        ]
    return c_values(expressions)


def _item_offsets(layout: struct.Struct) -> list[tuple[int, int]]:
    """(offset, size) of each item of a standard-size struct format such as '=IIBBH16s'."""
    items, offset = [], 0
    for count, code in _items(layout.format):
        size = struct.calcsize(f"={count}{code}") if code == "s" else struct.calcsize(f"={code}")
        for _ in range(1 if code == "s" else count):
            items.append((offset, size))
            offset += size
    return items


def _items(fmt: str) -> list[tuple[int, str]]:
    parsed, digits = [], ""
    for char in fmt.lstrip("=<>!@"):
        if char.isdigit():
            digits += char
        else:
            parsed.append((int(digits or 1), char))
            digits = ""
    return parsed


@pytest.mark.parametrize("name", sorted(NUMPY_MIRRORS))
def test_numpy_dtypes_match_the_c_structs(name: str) -> None:
    dtype: np.dtype = NUMPY_MIRRORS[name]
    names = tuple(dtype.names or ())
    c = _layout(name, names)
    assert dtype.itemsize == c[f"sizeof(struct {name})"]
    for field_name in names:
        field_type, offset = dtype.fields[field_name][:2]  # type: ignore[index]
        assert (offset, field_type.itemsize) == (
            c[f"offsetof(struct {name}, {field_name})"],
            c[f"sizeof(((struct {name} *)0)->{field_name})"],
        ), field_name


@pytest.mark.parametrize("name", sorted(STRUCT_MIRRORS))
def test_struct_formats_match_the_c_structs(name: str) -> None:
    layout, names = STRUCT_MIRRORS[name]
    c = _layout(name, names)
    assert layout.size == c[f"sizeof(struct {name})"]
    expected = [(c[f"offsetof(struct {name}, {n})"], c[f"sizeof(((struct {name} *)0)->{n})"]) for n in names]
    assert _item_offsets(layout) == expected


def test_the_ctypes_config_matches_the_c_struct() -> None:
    """struct datapath_config is written field by field through an mmap (maps.DatapathConfig)."""
    names = tuple(name for name, _ in maps.DatapathConfig._fields_)
    c = _layout("datapath_config", names)
    assert ctypes.sizeof(maps.DatapathConfig) == c["sizeof(struct datapath_config)"]
    for name in names:
        field = getattr(maps.DatapathConfig, name)
        assert (field.offset, field.size) == (
            c[f"offsetof(struct datapath_config, {name})"],
            c[f"sizeof(((struct datapath_config *)0)->{name})"],
        ), name


def test_constants_match_the_header() -> None:
    assert c_values(list(CONSTANTS)) == CONSTANTS


def test_every_verdict_has_its_name_in_the_record_schema() -> None:
    schema = json.loads((files("agent.schema") / "flow-record.v1.json").read_text())
    assert schema["properties"]["verdict"]["enum"] == [str(verdict) for verdict in Verdict]


def test_map_pins_name_every_pinned_map_of_the_program() -> None:
    source = (Path(__file__).resolve().parents[2] / "bpf" / "egress.c").read_text()
    pinned = {
        line.split(",")[3].strip() for line in source.splitlines() if line.startswith("BPF_TABLE_PINNED(")
    }
    # the ring buffer is declared by hand (BCC has no pinned BPF_RINGBUF_OUTPUT)
    pinned |= set(re.findall(r"^struct (\w+)_table_t \1 =", source, re.MULTILINE))
    assert pinned == set(maps.MAP_PINS)


@pytest.mark.parametrize(("dest", "family"), [("198.51.100.0/24", 4), ("2001:db8:100::/48", 6)])
def test_lpm_entry_bytes_sit_where_the_c_key_has_its_fields(dest: str, family: int) -> None:
    rule = Rule(258, "web", dest, "cidr", 443, "tcp", "block", "2026-12-01T00:00:00Z", (dest,))
    (entry,) = lpm_entries([rule], {"web": 0x01020304})
    key, value = entry.key_bytes(), entry.value_bytes()
    c = _layout("policy_lpm_key", ("prefixlen", "slot", "proto", "family", "port", "addr"))
    c.update(_layout("policy_rule", ("rule_id", "action", "addr_prefixlen")))

    def read(name: str, field_name: str, raw: bytes) -> bytes:
        offset = c[f"offsetof(struct {name}, {field_name})"]
        return raw[offset : offset + c[f"sizeof(((struct {name} *)0)->{field_name})"]]

    network = ipaddress.ip_network(dest)
    native = sys.byteorder
    assert len(key) == c["sizeof(struct policy_lpm_key)"]
    assert int.from_bytes(read("policy_lpm_key", "prefixlen", key), native) == 64 + network.prefixlen
    assert int.from_bytes(read("policy_lpm_key", "slot", key), native) == 0x01020304
    assert read("policy_lpm_key", "proto", key) + read("policy_lpm_key", "family", key) == bytes([6, family])
    assert int.from_bytes(read("policy_lpm_key", "port", key), native) == 443  # host byte order
    assert read("policy_lpm_key", "addr", key) == network.network_address.packed.ljust(16, b"\0")
    assert int.from_bytes(read("policy_rule", "rule_id", value), native) == 258
    assert read("policy_rule", "action", value) + read("policy_rule", "addr_prefixlen", value) == bytes(
        [POLICY_DROP, network.prefixlen]
    )
