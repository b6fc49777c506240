"""Read-only rtnetlink dumps (links, addresses, tc filters) by a raw socket and struct.

The inventory and the quick front ends (egress-block finds a container's veths and
whether our filter is on them) only read a few attributes. pyroute2 costs 35-150 ms
to import, more than the whole of egress-block's own work; this costs ~1 ms. Changes
(tc attach and detach) still go through pyroute2 (agent/netlink.py).

A dump the kernel marks interrupted (links came or went meanwhile) raises
DumpInterrupted: the caller tries again, as with pyroute2's NetlinkDumpInterrupted.
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

NETLINK_ROUTE = 0
RTM_GETLINK, RTM_GETADDR, RTM_GETTFILTER = 18, 22, 46
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_DUMP, NLM_F_DUMP_INTR = 0x1, 0x300, 0x10
NLA_TYPE_MASK = 0x3FFF  # without the nested/byte-order flag bits
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER, IFLA_LINKINFO, IFLA_LINK_NETNSID = 1, 3, 5, 10, 18, 37
IFLA_INFO_KIND = 1
IFA_ADDRESS = 1
TCA_KIND, TCA_OPTIONS = 1, 2
TCA_BPF_NAME = 7

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
_IFINFOMSG = struct.Struct("=BxHiII")  # family, type, index, flags, change
_IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
_TCMSG = struct.Struct("=BxxxiIII")  # family, ifindex, handle, parent, info
_NLATTR = struct.Struct("=HH")  # len, type
_RECV_BYTES = 1 << 20


class DumpInterrupted(OSError):
    """The kernel's dump changed while it was read: try again."""


@dataclass(frozen=True)
class Link:
    index: int
    name: str
    mac: str  # "" when the link has none
    peer_index: int  # IFLA_LINK: a veth's peer ifindex (in the peer's netns), else 0
    peer_in_other_netns: bool  # IFLA_LINK_NETNSID present: the peer lives in another netns
    master: int  # IFLA_MASTER: the bridge it is enslaved to, else 0
    kind: str  # IFLA_INFO_KIND: "veth", "bridge" ... ("" for a physical device)


@dataclass(frozen=True)
class TcFilter:
    kind: str  # "bpf" ...; "" for the chain entries a dump also lists
    bpf_name: str  # TCA_BPF_NAME of a bpf filter, else ""


def _attributes(data: bytes | memoryview, offset: int = 0) -> dict[int, memoryview]:
    """type -> payload of each netlink attribute from offset on (the last one of a type wins)."""
    view = memoryview(data)
    found = {}
    while offset + _NLATTR.size <= len(view):
        length, kind = _NLATTR.unpack_from(view, offset)
        if length < _NLATTR.size:
            break
        found[kind & NLA_TYPE_MASK] = view[offset + _NLATTR.size : offset + length]
        offset += (length + 3) & ~3
    return found


def _text(payload: memoryview | None) -> str:
    return bytes(payload).split(b"\0", 1)[0].decode() if payload is not None else ""


def _u32(payload: memoryview | None) -> int:
    return struct.unpack("=I", payload[:4])[0] if payload is not None else 0


class RtnlSocket:
    """One NETLINK_ROUTE socket, in the netns of the thread that opens it."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)
        self._socket.bind((0, 0))
        self._seq = int.from_bytes(os.urandom(2), "little")

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> RtnlSocket:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _dump(self, message_type: int, body: bytes) -> Iterator[memoryview]:
        """The payload of each message the kernel answers a dump request with."""
        self._seq += 1
        header = _NLMSGHDR.pack(
            _NLMSGHDR.size + len(body), message_type, NLM_F_REQUEST | NLM_F_DUMP, self._seq, 0
        )
        self._socket.send(header + body)
        interrupted = False
        while True:
            view = memoryview(self._socket.recv(_RECV_BYTES))
            offset = 0
            while offset + _NLMSGHDR.size <= len(view):
                length, kind, flags, seq, _pid = _NLMSGHDR.unpack_from(view, offset)
                payload = view[offset + _NLMSGHDR.size : offset + length]
                offset += (length + 3) & ~3
                if seq != self._seq:
                    continue  # an answer to an earlier request
                interrupted |= bool(flags & NLM_F_DUMP_INTR)
                if kind == NLMSG_DONE:
                    error = -struct.unpack_from("=i", payload)[0] if len(payload) >= 4 else 0
                    if error > 0:
                        raise OSError(error, os.strerror(error))
                    if interrupted:
                        raise DumpInterrupted("netlink dump interrupted")
                    return
                if kind == NLMSG_ERROR:
                    error = -struct.unpack_from("=i", payload)[0]
                    if error:
                        raise OSError(error, os.strerror(error))
                    return
                yield payload

    def links(self) -> list[Link]:
        found = []
        for payload in self._dump(RTM_GETLINK, _IFINFOMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            index = _IFINFOMSG.unpack_from(payload)[2]
            attrs = _attributes(payload, _IFINFOMSG.size)
            mac = attrs.get(IFLA_ADDRESS)
            info = attrs.get(IFLA_LINKINFO)
            found.append(
                Link(
                    index=index,
                    name=_text(attrs.get(IFLA_IFNAME)),
                    mac=":".join(f"{byte:02x}" for byte in mac) if mac is not None else "",
                    peer_index=_u32(attrs.get(IFLA_LINK)),
                    peer_in_other_netns=IFLA_LINK_NETNSID in attrs,
                    master=_u32(attrs.get(IFLA_MASTER)),
                    kind=_text(_attributes(info).get(IFLA_INFO_KIND)) if info is not None else "",
                )
            )
        return found

    def addresses(self) -> set[str]:
        """Every IFA_ADDRESS of every interface, IPv4 and IPv6."""
        found = set()
        for payload in self._dump(RTM_GETADDR, _IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family = payload[0]
            address = _attributes(payload, _IFADDRMSG.size).get(IFA_ADDRESS)
            if address is not None and family in (socket.AF_INET, socket.AF_INET6):
                found.add(socket.inet_ntop(family, bytes(address)))
        return found

    def filters(self, ifindex: int, parent: int) -> list[TcFilter]:
        """The tc filters on one hook (e.g. clsact ingress) of a link."""
        found = []
        for payload in self._dump(RTM_GETTFILTER, _TCMSG.pack(socket.AF_UNSPEC, ifindex, 0, parent, 0)):
            attrs = _attributes(payload, _TCMSG.size)
            options = attrs.get(TCA_OPTIONS)
            name = _text(_attributes(options).get(TCA_BPF_NAME)) if options is not None else ""
            found.append(TcFilter(kind=_text(attrs.get(TCA_KIND)), bpf_name=name))
        return found
