"""rtnetlink message layout: headers, attributes, and the few answers we read.

Only what the agent sends and reads: links (RTM_*LINK), addresses, tc qdiscs and
filters, netns ids. Layouts are the kernel's uapi structs (linux/netlink.h,
linux/rtnetlink.h, linux/pkt_sched.h, linux/net_namespace.h).
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

NETLINK_ROUTE = 0
RTMGRP_LINK = 0x1

NLMSG_ERROR, NLMSG_DONE = 2, 3
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_GETADDR = 22
RTM_NEWQDISC, RTM_DELQDISC = 36, 37
RTM_NEWTFILTER, RTM_DELTFILTER, RTM_GETTFILTER = 44, 45, 46
RTM_NEWNSID, RTM_GETNSID = 88, 90

NLM_F_REQUEST, NLM_F_ACK, NLM_F_DUMP_INTR = 0x1, 0x4, 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE, NLM_F_EXCL, NLM_F_CREATE = 0x100, 0x200, 0x400
NLA_TYPE_MASK = 0x3FFF  # without the nested/byte-order flag bits

IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_LINK_NETNSID = 1, 3, 5, 10, 18, 37
IFLA_INFO_KIND = 1
IFA_ADDRESS = 1
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_CLASSID, TCA_BPF_FD, TCA_BPF_NAME, TCA_BPF_FLAGS = 3, 6, 7, 8
TCA_BPF_FLAG_ACT_DIRECT = 1
NETNSA_NSID, NETNSA_FD = 1, 3

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
RTGENMSG = struct.Struct("=Bxxx")  # family, padded to 4 as the kernel parses it
NLATTR = struct.Struct("=HH")  # len, type
_U32 = struct.Struct("=I")
_S32 = struct.Struct("=i")


def aligned(length: int) -> int:
    return (length + 3) & ~3


def message(kind: int, flags: int, seq: int, body: bytes) -> bytes:
    return NLMSGHDR.pack(NLMSGHDR.size + len(body), kind, flags, seq, 0) + body


def attribute(kind: int, payload: bytes) -> bytes:
    """One attribute, padded to 4 bytes (the padding is outside its length)."""
    length = NLATTR.size + len(payload)
    return NLATTR.pack(length, kind) + payload + b"\0" * (aligned(length) - length)


def u32_attribute(kind: int, value: int) -> bytes:
    return attribute(kind, _U32.pack(value))


def text_attribute(kind: int, value: str) -> bytes:
    return attribute(kind, value.encode() + b"\0")


def attributes(data: bytes | memoryview, offset: int = 0) -> dict[int, memoryview]:
    """type -> payload of each netlink attribute from offset on (the last one of a type wins)."""
    view = memoryview(data)
    found = {}
    while offset + NLATTR.size <= len(view):
        length, kind = NLATTR.unpack_from(view, offset)
        if length < NLATTR.size:
            break
        found[kind & NLA_TYPE_MASK] = view[offset + NLATTR.size : offset + length]
        offset += aligned(length)
    return found


def text(payload: memoryview | None) -> str:
    return bytes(payload).split(b"\0", 1)[0].decode() if payload is not None else ""


def u32(payload: memoryview | None) -> int:
    return _U32.unpack_from(payload)[0] if payload is not None else 0


def s32(payload: memoryview) -> int:
    return _S32.unpack_from(payload)[0]


def error_code(payload: memoryview) -> int:
    """The errno of an NLMSG_ERROR (0: an ACK) or of a dump's NLMSG_DONE."""
    return -s32(payload) if len(payload) >= 4 else 0


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str  # "" when the link has none
    peer_index: int  # IFLA_LINK: a veth's peer ifindex (in the peer's netns), else 0
    peer_netnsid: int | None  # IFLA_LINK_NETNSID: the peer's netns as this one numbers it
    master: int  # IFLA_MASTER: the bridge it is enslaved to, else 0
    kind: str  # IFLA_INFO_KIND: "veth", "bridge" ... ("" for a physical device)

    @property
    def peer_in_other_netns(self) -> bool:
        return self.peer_netnsid is not None


def parse_link(payload: memoryview) -> Link:
    """An RTM_NEWLINK/RTM_DELLINK body (a dump's answer or an event)."""
    index = IFINFOMSG.unpack_from(payload)[2]
    attrs = attributes(payload, IFINFOMSG.size)
    mac = attrs.get(IFLA_ADDRESS)
    info = attrs.get(IFLA_LINKINFO)
    netnsid = attrs.get(IFLA_LINK_NETNSID)
    return Link(
        index=index,
        name=text(attrs.get(IFLA_IFNAME)),
        mac=":".join(f"{byte:02x}" for byte in mac) if mac is not None else "",
        peer_index=u32(attrs.get(IFLA_LINK)),
        peer_netnsid=s32(netnsid) if netnsid is not None else None,
        master=u32(attrs.get(IFLA_MASTER)),
        kind=text(attributes(info).get(IFLA_INFO_KIND)) if info is not None else "",
    )


def link_request(ifindex: int = 0) -> bytes:
    return IFINFOMSG.pack(socket.AF_UNSPEC, 0, ifindex, 0, 0)


@dataclass(frozen=True)
class TcFilter:
    kind: str  # "bpf" ...; "" for the chain entries a dump also lists
    bpf_name: str  # TCA_BPF_NAME of a bpf filter, else ""


def parse_filter(payload: memoryview) -> TcFilter:
    attrs = attributes(payload, TCMSG.size)
    options = attrs.get(TCA_OPTIONS)
    name = text(attributes(options).get(TCA_BPF_NAME)) if options is not None else ""
    return TcFilter(kind=text(attrs.get(TCA_KIND)), bpf_name=name)


def tc_request(ifindex: int, handle: int, parent: int, info: int = 0) -> bytes:
    """A struct tcmsg: a qdisc or filter by link, handle, parent; info = prio << 16 | protocol."""
    return TCMSG.pack(socket.AF_UNSPEC, ifindex, handle, parent, info)
