"""The compiled datapath against a small reference model, on generated packets and rules.

The real bpf/egress.c is built by the project's loader with its pins in a private
directory under /sys/fs/bpf (never the live datapath's), its maps are filled through
the project's own path (policy.lpm_entries -> Maps.sync_policy, Maps.set_endpoint,
Maps.set_hold_unknown), and each generated frame is run through the program with
BPF_PROG_TEST_RUN. The verdict, the flow the program counted, and the per-veth and
per-rule counters must equal what README promises:

- the packet side (`reference_parse`): which addresses, protocol and ports the
  parser must extract, and when it cannot reach the transport header (then a
  container with rules drops the packet as dropped_unparsed);
- the rule side: agent/policy/semantics.py `winning_rule`, README's matching semantics.
"""

from __future__ import annotations

import ipaddress
import shutil
import struct
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import pytest
from frames import (
    AH,
    DSTOPTS,
    ETH_HLEN,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    FRAGMENT,
    GRE,
    HOPOPTS,
    ICMP,
    ICMPV6,
    IPV6_EXT_HEADERS,
    SCTP,
    TCP,
    UDP,
    ExtHeader,
    ethernet,
    ipv4,
    ipv6,
    transport,
)
from hypothesis import event, example, given, settings
from hypothesis import strategies as st
from private_datapath import write_veth_slot
from prog_run import TC_ACT_SHOT, TC_ACT_UNSPEC, Program, skb_context

from agent.datapath import Datapath, EndpointTotals, IfindexCounters
from agent.model import Verdict
from agent.policy import Rule, lpm_entries, winning_rule

pytestmark = pytest.mark.system

EXAMPLES = 1000
settings.register_profile(
    "datapath-property",
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run and in CI
    database=None,
)

IFINDEX = 1  # test runs use the loopback device: skb->ifindex comes from it (ctx ifindex <= 1)
SLOT, OTHER_SLOT = 7, 8
MAX_IPV6_EXT_HEADERS = 6  # README: the parser follows six
VERDICT_CODES = {verdict: code for code, verdict in enumerate(Verdict)}  # enum verdict order

V4_DESTINATIONS = ("198.51.100.7", "198.51.100.200", "198.18.3.4", "198.19.255.1")
V6_DESTINATIONS = ("2001:db8:100::7", "2001:db8:100::c8", "2001:db8:7::1", "2001:db8:ffff::2")
V4_SOURCE, V6_SOURCE = "198.18.0.2", "2001:db8:1::2"
PORTS = (53, 443, 9444, 40000)

EndpointState = Literal["rules", "no_rules", "unknown", "unknown_held"]
Outcome = Literal["ok", "unparsed", "no_ip_header", "not_ip"]


@pytest.fixture(scope="module")
def datapath() -> Iterator[Datapath]:
    pin_dir = Path(tempfile.mkdtemp(prefix="egress-top-property-", dir="/sys/fs/bpf"))
    try:
        loaded = Datapath(flow_table_size=1024, pin_dir=pin_dir)
        try:
            yield loaded
        finally:
            loaded.close()
    finally:
        shutil.rmtree(pin_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def program(datapath: Datapath) -> Program:
    return Program(datapath.program_fd, skb_context(IFINDEX))


# --- generated frames -------------------------------------------------------------


def _shortest_runnable(family: int) -> int:
    """BPF_PROG_TEST_RUN refuses (EINVAL) an IP frame shorter than its fixed IP header,
    so a truncated IP header is tested by tests/test_system_evasion.py on a real veth."""
    return ETH_HLEN + (20 if family == 4 else 40)


@dataclass(frozen=True)
class Generated:
    frame: bytes
    what: str  # for the failure report
    dst: str | None = None  # the destination it was built with, for rules about it


@st.composite
def frames(draw: st.DrawFn) -> Generated:
    family = draw(st.sampled_from((4, 4, 6, 6, 6, 0)))
    if family == 0:  # ARP, VLAN, anything not IP
        ethertype = draw(st.sampled_from((ETH_P_ARP, 0x8100, 0x88CC)))
        return Generated(ethernet(ethertype, draw(st.binary(max_size=60))), f"ethertype {ethertype:#x}")
    protos = (TCP, UDP, ICMP, SCTP, GRE, 253) if family == 4 else (TCP, UDP, ICMPV6, SCTP, 59, 253)
    proto = draw(st.sampled_from(protos))
    src_port = draw(st.sampled_from((*PORTS, 12345)))
    dst_port = draw(st.sampled_from(PORTS))
    body = transport(proto, src_port, dst_port, draw(st.binary(max_size=24)))
    # Shift the IP length field: negative cuts the packet short of its frame (the rest
    # is padding a receiver trims), positive claims more than the frame holds.
    length_shift = draw(st.sampled_from((0, 0, 0, -2, -6, -12, 40)))
    if family == 4:
        fragment = draw(st.sampled_from(("none", "none", "first", "later")))
        frag_field = {"none": 0, "first": 0x2000, "later": draw(st.integers(1, 0x1FFF))}[fragment]
        options = draw(st.sampled_from((0, 0, 1, 10)))
        dst = draw(st.sampled_from(V4_DESTINATIONS))
        packet = ipv4(V4_SOURCE, dst, proto, body, frag_field, options, length_shift)
        what = f"ipv4 proto {proto} {dst}:{dst_port} fragment={fragment} options={options}"
    else:
        chain = tuple(
            draw(
                st.lists(
                    st.builds(
                        ExtHeader,
                        kind=st.sampled_from(IPV6_EXT_HEADERS),
                        units=st.integers(0, 2),
                        fragment_offset=st.sampled_from((0, 0, 1, 185)),
                    ),
                    max_size=12,
                )
            )
        )
        dst = draw(st.sampled_from(V6_DESTINATIONS))
        packet = ipv6(V6_SOURCE, dst, proto, chain, body, length_shift)
        what = f"ipv6 proto {proto} [{dst}]:{dst_port} chain={[(h.kind, h.units, h.fragment_offset) for h in chain]}"
    frame = ethernet(ETH_P_IP if family == 4 else ETH_P_IPV6, packet)
    cut = draw(st.one_of(st.none(), st.integers(_shortest_runnable(family), len(frame))))
    return Generated(frame[:cut], f"{what} shift={length_shift} cut={cut}/{len(frame)}", dst)


# --- the reference model: packet side ---------------------------------------------------


@dataclass(frozen=True)
class Parsed:
    outcome: Outcome
    family: int = 0
    proto: int = 0
    src: str = ""
    dst: str = ""
    src_port: int = 0  # ICMP: type
    dst_port: int = 0  # ICMP: code


def reference_parse(frame: bytes) -> Parsed:
    """What the parser must extract (README, "How a flow is attributed" and the
    enforcement section). The transport header counts as reached when the bytes the
    rules need (ports, or ICMP type and code) lie inside the IP packet, which ends at
    its IP length or the frame's end, whichever comes first. A later fragment has no
    transport header and is parsed without ports."""
    ethertype = int.from_bytes(frame[12:14], "big")
    if ethertype not in (ETH_P_IP, ETH_P_IPV6):
        return Parsed("not_ip")
    ip = frame[ETH_HLEN:]
    if ethertype == ETH_P_IP:
        if len(ip) < 20:
            return Parsed("no_ip_header")
        header_len, ip_len = (ip[0] & 0xF) * 4, int.from_bytes(ip[2:4], "big")
        known = Parsed(
            "ok", 4, ip[9], str(ipaddress.IPv4Address(ip[12:16])), str(ipaddress.IPv4Address(ip[16:20]))
        )
        if header_len < 20 or (ip_len and ip_len < header_len):
            return replace(known, outcome="unparsed")
        if int.from_bytes(ip[6:8], "big") & 0x1FFF:
            return known  # later fragment
        return _reachtransport(ip, known, header_len, _packet_end(ip, ip_len))
    if len(ip) < 40:
        return Parsed("no_ip_header")
    payload_len = int.from_bytes(ip[4:6], "big")
    end = _packet_end(ip, 40 + payload_len if payload_len else 0)
    known = Parsed("ok", 6, 0, str(ipaddress.IPv6Address(ip[8:24])), str(ipaddress.IPv6Address(ip[24:40])))
    next_header, offset = ip[6], 40
    for _ in range(MAX_IPV6_EXT_HEADERS):
        if next_header not in IPV6_EXT_HEADERS:
            break
        if offset + 8 > end:  # a first fragment without its transport header ends here
            return replace(known, outcome="unparsed", proto=next_header)
        kind, next_header, length = next_header, ip[offset], ip[offset + 1]
        if kind == FRAGMENT:
            offset += 8
            if int.from_bytes(ip[offset - 6 : offset - 4], "big") & 0xFFF8:
                return replace(known, proto=next_header)  # later fragment
        else:
            offset += (length + 2) * 4 if kind == AH else (length + 1) * 8
    if next_header in IPV6_EXT_HEADERS:
        return replace(known, outcome="unparsed", proto=next_header)  # a longer chain than six
    return _reachtransport(ip, replace(known, proto=next_header), offset, end)


def _packet_end(ip: bytes, ip_len: int) -> int:
    return min(ip_len, len(ip)) if ip_len else len(ip)


def _reachtransport(ip: bytes, known: Parsed, offset: int, end: int) -> Parsed:
    needed = 4 if known.proto in (TCP, UDP, SCTP) else 2 if known.proto in (ICMP, ICMPV6) else 0
    if offset + needed > end:
        return replace(known, outcome="unparsed")
    if needed == 4:
        return replace(
            known,
            src_port=int.from_bytes(ip[offset : offset + 2], "big"),
            dst_port=int.from_bytes(ip[offset + 2 : offset + 4], "big"),
        )
    if needed == 2:
        return replace(known, src_port=ip[offset], dst_port=ip[offset + 1])
    return known


# --- rules ----------------------------------------------------------------------------


@st.composite
def rules(draw: st.DrawFn, about: str | None = None) -> list[Rule]:
    """A store's worth of rules for our container and another one, in age order; many
    about the address `about`, so that rules often meet the packet, and many on the
    prefix of the rule before, so that port, protocol and age settle ties."""
    drawn = []
    for rule_id in range(1, draw(st.sampled_from(range(11))) + 1):
        family = draw(st.sampled_from((4, 6)))
        pool = V4_DESTINATIONS if family == 4 else V6_DESTINATIONS
        address = about if about and draw(st.booleans()) else draw(st.sampled_from(pool))
        family = ipaddress.ip_address(address).version
        prefix = draw(st.sampled_from((0, 16, 32) if family == 4 else (0, 48, 128)))
        network = str(ipaddress.ip_network(f"{address}/{prefix}", strict=False))
        if drawn and draw(st.booleans()):  # the previous rule's prefix: the tie-breaks decide
            network = drawn[-1].dest
        proto = draw(st.sampled_from(("tcp", "udp", "icmp", "any", "any")))
        port = draw(st.sampled_from((None, None, *PORTS))) if proto != "icmp" else None
        drawn.append(
            Rule(
                rule_id=rule_id,
                container=draw(st.sampled_from(("web", "web", "web", "web", "other"))),
                dest=network,
                dest_kind="cidr",
                port=port,
                proto=proto,  # type: ignore[arg-type]
                action=draw(st.sampled_from(("block", "allow"))),
                added_at="2026-12-01T00:00:00Z",
                addresses=(network,),
            )
        )
    return drawn


# --- the expected result ----------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    retval: int
    flows: dict[tuple, tuple[int, int, int, int]]  # key -> (packets, dropped_packets, verdict, rule_id)
    counters: dict[int, IfindexCounters]
    rule_packets: dict[int, int]


def _counters(**nonzero: int) -> IfindexCounters:
    fields = dict.fromkeys(IfindexCounters.__dataclass_fields__, 0)
    return IfindexCounters(**{**fields, **nonzero})


def expected_result(frame: bytes, state: EndpointState, store: list[Rule]) -> Expected:
    parsed = reference_parse(frame)
    ip_bytes = len(frame) - ETH_HLEN
    if parsed.outcome == "not_ip":
        return Expected(
            TC_ACT_UNSPEC, {}, {IFINDEX: _counters(non_ip_packets=1, non_ip_bytes=len(frame))}, {}
        )
    key = (IFINDEX, parsed.family, parsed.proto, parsed.src_port, parsed.dst_port, parsed.src, parsed.dst)
    has_flow = parsed.outcome != "no_ip_header"

    def unjudged(verdict: Verdict, counters: IfindexCounters) -> Expected:
        dropped = int(verdict != Verdict.FORWARDED)
        flows = {key: (1, dropped, VERDICT_CODES[verdict], 0)} if has_flow else {}
        return Expected(TC_ACT_SHOT if dropped else TC_ACT_UNSPEC, flows, {IFINDEX: counters}, {})

    if state == "unknown_held":
        return unjudged(Verdict.HELD, _counters(held_packets=1, held_bytes=ip_bytes))
    if parsed.outcome != "ok":
        if state == "rules":
            return unjudged(
                Verdict.DROPPED_UNPARSED,
                _counters(
                    unparsed_packets=1,
                    unparsed_bytes=ip_bytes,
                    unparsed_dropped_packets=1,
                    unparsed_dropped_bytes=ip_bytes,
                ),
            )
        return unjudged(Verdict.FORWARDED, _counters(unparsed_packets=1, unparsed_bytes=ip_bytes))

    winner = None
    if state == "rules":
        ours = [rule for rule in store if rule.container == "web"]
        dport = parsed.dst_port if parsed.proto in (TCP, UDP) else None
        winner = winning_rule(ours, parsed.dst, parsed.proto, dport)
    passed = {IFINDEX: _counters()}  # every veth that sent a packet has its totals entry
    if winner is None:
        return Expected(TC_ACT_UNSPEC, {key: (1, 0, VERDICT_CODES[Verdict.FORWARDED], 0)}, passed, {})
    if winner.action == "allow":
        flow = (1, 0, VERDICT_CODES[Verdict.FORWARDED], winner.rule_id)
        return Expected(TC_ACT_UNSPEC, {key: flow}, passed, {winner.rule_id: 1})
    flow = (1, 1, VERDICT_CODES[Verdict.DROPPED], winner.rule_id)
    counters = {IFINDEX: _counters(dropped_packets=1, dropped_bytes=ip_bytes)}
    return Expected(TC_ACT_SHOT, {key: flow}, counters, {winner.rule_id: 1})


def expected_totals(frame: bytes, expected: Expected) -> EndpointTotals:
    """A veth's totals count every IP packet, whatever else happens to it."""
    ip_bytes = len(frame) - ETH_HLEN if reference_parse(frame).outcome != "not_ip" else 0
    dropped = int(expected.retval == TC_ACT_SHOT)
    return EndpointTotals(int(ip_bytes > 0), ip_bytes, dropped, dropped * ip_bytes, 0, 0)


# --- what the program did ------------------------------------------------------------------


def _address(family: int, raw: bytes) -> str:
    return str(ipaddress.IPv4Address(raw[:4]) if family == 4 else ipaddress.IPv6Address(raw))


def counted_flows(datapath: Datapath, frame_bytes: int) -> dict[tuple, tuple[int, int, int, int]]:
    read = datapath.read_flows()
    flows = {}
    for key, stats in zip(read.keys, read.stats, strict=True):
        family = int(key["family"])
        flow_key = (
            int(key["ifindex"]),
            family,
            int(key["proto"]),
            int(key["src_port"]),
            int(key["dst_port"]),
            _address(family, bytes(key["src_addr"])),
            _address(family, bytes(key["dst_addr"])),
        )
        assert int(stats["bytes"]) == frame_bytes - ETH_HLEN  # IP bytes
        assert int(stats["dropped_bytes"]) == int(stats["dropped_packets"]) * (frame_bytes - ETH_HLEN)
        flows[flow_key] = (
            int(stats["packets"]),
            int(stats["dropped_packets"]),
            int(stats["verdict"]),
            int(stats["rule_id"]),
        )
    return flows


def reset_counters(datapath: Datapath) -> None:
    for pinned in (datapath.flows, datapath.ifindex_counters, datapath.rule_stats, datapath.flow_shares):
        for key in pinned.list_keys():
            pinned.delete(key)
    write_veth_slot(datapath, IFINDEX, b"")  # an array: zero every CPU's copy of the slot our veth claims
    for index in range(datapath.flow_cache.max_entries):  # and every set of the flow cache
        datapath.flow_cache.update(struct.pack("=I", index), b"")


def configure(datapath: Datapath, state: EndpointState, store: list[Rule]) -> None:
    slots = {"web": SLOT, "other": OTHER_SLOT}
    datapath.sync_policy((entry.key_bytes(), entry.value_bytes()) for entry in lpm_entries(store, slots))
    datapath.set_hold_unknown(state == "unknown_held")
    if state in ("unknown", "unknown_held"):
        datapath.forget_endpoints(keep=())
    else:
        datapath.set_endpoint(IFINDEX, SLOT, has_policy=state == "rules")
    reset_counters(datapath)


def check(
    datapath: Datapath, program: Program, generated: Generated, state: EndpointState, store: list[Rule]
) -> None:
    configure(datapath, state, store)
    expected = expected_result(generated.frame, state, store)
    retval = program.run(generated.frame)
    hits = datapath.read_rule_hits()
    assert (retval, counted_flows(datapath, len(generated.frame))) == (expected.retval, expected.flows), (
        generated.what
    )
    assert datapath.read_ifindex_counters() == expected.counters, generated.what
    assert datapath.read_endpoint_totals() == {IFINDEX: expected_totals(generated.frame, expected)}, (
        generated.what
    )
    assert {rule_id: hit.packets for rule_id, hit in hits.items()} == expected.rule_packets, generated.what
    ip_bytes = len(generated.frame) - ETH_HLEN
    assert all(hit.bytes == ip_bytes and hit.last_hit_ns > 0 for hit in hits.values()), hits


# --- the properties ------------------------------------------------------------------------

STATES: tuple[EndpointState, ...] = ("rules", "rules", "rules", "no_rules", "unknown", "unknown_held")


def _evasion_frame(ext_headers: int) -> bytes:
    chain = tuple(ExtHeader(DSTOPTS, 0, 0) for _ in range(ext_headers))
    return ethernet(
        ETH_P_IPV6, ipv6(V6_SOURCE, V6_DESTINATIONS[0], UDP, chain, transport(UDP, 40000, 9444, b"x"), 0)
    )


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Generated, list[Rule]]:
    generated = draw(frames())
    return generated, draw(rules(about=generated.dst))


@settings(settings.get_profile("datapath-property"))
@given(scenario=scenarios(), state=st.sampled_from(STATES))
@example(scenario=(Generated(_evasion_frame(7), "7 destination options"), []), state="rules")
def test_program_matches_the_reference_model(
    datapath: Datapath, program: Program, scenario: tuple[Generated, list[Rule]], state: EndpointState
) -> None:
    generated, store = scenario
    flows = expected_result(generated.frame, state, store).flows.values()
    decided = [
        f"{tuple(Verdict)[verdict]}{' by a rule' if rule_id else ''}" for _, _, verdict, rule_id in flows
    ]
    event(
        f"{reference_parse(generated.frame).outcome}, veth {state}: {decided or 'no flow'}"
    )  # pytest --hypothesis-show-statistics
    check(datapath, program, generated, state, store)


def _block_9444(dest: str, rule_id: int = 1) -> Rule:
    return Rule(rule_id, "web", dest, "cidr", 9444, "udp", "block", "2026-12-01T00:00:00Z", (dest,))


@pytest.mark.parametrize("ext_headers", [0, 6, 7, 8, 12])
def test_a_long_extension_chain_cannot_walk_past_a_port_rule(
    datapath: Datapath, program: Program, ext_headers: int
) -> None:
    """The evasion of issue 10 item 13, spelled out: six headers are followed and the
    rule drops the datagram; a seventh and beyond fail closed instead of passing."""
    frame = _evasion_frame(ext_headers)
    store = [_block_9444(f"{V6_DESTINATIONS[0]}/128")]
    configure(datapath, "rules", store)
    assert program.run(frame) == TC_ACT_SHOT
    ((key, stats),) = counted_flows(datapath, len(frame)).items()
    if ext_headers <= MAX_IPV6_EXT_HEADERS:
        assert key[2:5] == (UDP, 40000, 9444)
        assert stats == (1, 1, VERDICT_CODES[Verdict.DROPPED], 1)
    else:
        assert key[2:5] == (DSTOPTS, 0, 0)
        assert stats == (1, 1, VERDICT_CODES[Verdict.DROPPED_UNPARSED], 0)
        counters = datapath.read_ifindex_counters()[IFINDEX]
        assert (counters.unparsed_dropped_packets, counters.dropped_packets) == (1, 0)


def test_a_first_fragment_without_its_transport_header_fails_closed(
    datapath: Datapath, program: Program
) -> None:
    """Its IP length ends after the fragment header; a harmless-looking UDP header in
    the frame's padding must not be read as its ports."""
    chain = (ExtHeader(FRAGMENT, 0, 0),)
    padding = transport(UDP, 40000, 53, b"")
    frame = ethernet(ETH_P_IPV6, ipv6(V6_SOURCE, V6_DESTINATIONS[0], UDP, chain, padding, -len(padding)))
    configure(datapath, "rules", [_block_9444("2001:db8::/32")])
    assert program.run(frame) == TC_ACT_SHOT
    assert counted_flows(datapath, len(frame)) == {
        (IFINDEX, 6, UDP, 0, 0, V6_SOURCE, V6_DESTINATIONS[0]): (
            1,
            1,
            VERDICT_CODES[Verdict.DROPPED_UNPARSED],
            0,
        )
    }
    configure(datapath, "no_rules", [])
    assert program.run(frame) == TC_ACT_UNSPEC  # without rules: counted, passed
    assert datapath.read_ifindex_counters()[IFINDEX] == _counters(
        unparsed_packets=1, unparsed_bytes=len(frame) - ETH_HLEN
    )


def test_every_truncation_of_a_udp_datagram(datapath: Datapath, program: Program) -> None:
    """Cut at every length the kernel will test-run: never a crash, never a port read from
    outside the packet."""
    store = [_block_9444("0.0.0.0/0", 1), _block_9444("::/0", 2)]
    for family in (4, 6):
        body = transport(UDP, 40000, 9444, b"payload")
        packet = (
            ipv4(V4_SOURCE, V4_DESTINATIONS[0], UDP, body, 0, 0, 0)
            if family == 4
            else ipv6(V6_SOURCE, V6_DESTINATIONS[0], UDP, (ExtHeader(HOPOPTS, 1, 0),), body, 0)
        )
        frame = ethernet(ETH_P_IP if family == 4 else ETH_P_IPV6, packet)
        for cut in range(_shortest_runnable(family), len(frame) + 1):
            check(datapath, program, Generated(frame[:cut], f"ipv{family} cut at {cut}"), "rules", store)
