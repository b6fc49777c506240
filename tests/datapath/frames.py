"""Ethernet frames with IPv4/IPv6 packets built field by field, for BPF_PROG_TEST_RUN."""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

ETH_HLEN = 14
ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
TCP, UDP, ICMP, ICMPV6, SCTP, GRE = 6, 17, 1, 58, 132, 47
HOPOPTS, ROUTING, FRAGMENT, DSTOPTS, AH = 0, 43, 44, 60, 51
IPV6_EXT_HEADERS = (HOPOPTS, ROUTING, FRAGMENT, DSTOPTS, AH)


def ethernet(ethertype: int, payload: bytes) -> bytes:
    return (
        bytes.fromhex("02420a000001") + bytes.fromhex("02420a000002") + struct.pack("!H", ethertype) + payload
    )


def transport(proto: int, src_port: int, dst_port: int, payload: bytes) -> bytes:
    if proto == TCP:
        return struct.pack("!HHIIBBHHH", src_port, dst_port, 1, 0, 5 << 4, 0x02, 1024, 0, 0) + payload
    if proto in (UDP, SCTP):
        return struct.pack("!HHHH", src_port, dst_port, 8 + len(payload), 0) + payload
    if proto in (ICMP, ICMPV6):
        return struct.pack("!BBHI", src_port % 256, dst_port % 256, 0, 0) + payload
    return payload


def ipv4(
    src: str, dst: str, proto: int, body: bytes, frag_field: int, options: int, length_shift: int
) -> bytes:
    ihl = 5 + options
    total = ihl * 4 + len(body) + length_shift
    header = struct.pack(
        "!BBHHHBBH4s4s",
        0x40 | ihl,
        0,
        max(total, 0) & 0xFFFF,
        0x1234,
        frag_field,
        64,
        proto,
        0,
        ipaddress.IPv4Address(src).packed,
        ipaddress.IPv4Address(dst).packed,
    )
    return header + b"\x01" * (options * 4) + body


def _ext_header(kind: int, next_header: int, units: int, fragment_offset: int) -> bytes:
    if kind == FRAGMENT:
        return struct.pack("!BBHI", next_header, 0, (fragment_offset << 3) | 1, 0xABCD)
    if kind == AH:  # (len + 2) * 4 bytes; 12 is its smallest
        length = 1 + 2 * units
        return struct.pack("!BB", next_header, length) + b"\0" * ((length + 2) * 4 - 2)
    return struct.pack("!BB", next_header, units) + b"\x01\x00" + b"\0" * ((units + 1) * 8 - 4)  # PadN


@dataclass(frozen=True)
class ExtHeader:
    kind: int
    units: int  # length field's size units
    fragment_offset: int  # for FRAGMENT: in 8-byte units, 0 = first fragment


def ipv6(
    src: str, dst: str, proto: int, chain: tuple[ExtHeader, ...], body: bytes, length_shift: int
) -> bytes:
    kinds = [header.kind for header in chain] + [proto]
    headers = b"".join(
        _ext_header(header.kind, kinds[position + 1], header.units, header.fragment_offset)
        for position, header in enumerate(chain)
    )
    payload = headers + body
    fixed = struct.pack(
        "!IHBB16s16s",
        6 << 28,
        max(len(payload) + length_shift, 0) & 0xFFFF,
        kinds[0],
        64,
        ipaddress.IPv6Address(src).packed,
        ipaddress.IPv6Address(dst).packed,
    )
    return fixed + payload
