"""Requests and dumps on one NETLINK_ROUTE socket, by a raw socket and struct.

pyroute2 cost 35-150 ms and ~4 MB of RSS to import, more than egress-block's whole
work; this costs ~1 ms. A change is sent with NLM_F_ACK and the kernel's NLMSG_ERROR
raises OSError with its errno, so callers test EEXIST, ENOENT, ENODEV as they would
for a syscall. A dump the kernel marks interrupted (links came or went meanwhile)
raises DumpInterrupted: the caller tries again.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterator
from typing import Self

from agent.rtnl.messages import (
    IFA_ADDRESS,
    IFADDRMSG,
    NETLINK_ROUTE,
    NETNSA_FD,
    NETNSA_NSID,
    NLM_F_ACK,
    NLM_F_DUMP,
    NLM_F_DUMP_INTR,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    NLMSGHDR,
    RTGENMSG,
    RTM_GETADDR,
    RTM_GETLINK,
    RTM_GETNSID,
    RTM_GETTFILTER,
    RTM_NEWLINK,
    RTM_NEWNSID,
    Link,
    TcFilter,
    aligned,
    attributes,
    error_code,
    link_request,
    message,
    parse_filter,
    parse_link,
    s32,
    tc_request,
    u32_attribute,
)

_RECV_BYTES = 1 << 20


class DumpInterrupted(OSError):
    """The kernel's dump changed while it was read: try again."""


def _raise_for(code: int) -> None:
    if code:
        raise OSError(code, os.strerror(code))


class RouteSocket:
    """A NETLINK_ROUTE socket, in the netns of the thread that opens it; closed on exit."""

    def __init__(self) -> None:
        self._socket = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, NETLINK_ROUTE)

    def fileno(self) -> int:
        return self._socket.fileno()

    def close(self) -> None:
        self._socket.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class RtnlSocket(RouteSocket):
    """Requests and dumps: bound to no multicast group."""

    def __init__(self) -> None:
        super().__init__()
        self._socket.bind((0, 0))
        self._seq = int.from_bytes(os.urandom(2), "little")

    def _answers(self, kind: int, flags: int, body: bytes) -> Iterator[tuple[int, memoryview]]:
        """(type, payload) of each message the kernel answers with, up to its NLMSG_DONE
        (a dump) or NLMSG_ERROR (an ACK, or the error a request or dump failed with)."""
        self._seq += 1
        self._socket.send(message(kind, flags, self._seq, body))
        interrupted = False
        while True:
            view = memoryview(self._socket.recv(_RECV_BYTES))
            offset = 0
            while offset + NLMSGHDR.size <= len(view):
                length, answer, answer_flags, seq, _pid = NLMSGHDR.unpack_from(view, offset)
                if length < NLMSGHDR.size:
                    break
                payload = view[offset + NLMSGHDR.size : offset + length]
                offset += aligned(length)
                if seq != self._seq:
                    continue  # an answer to an earlier request
                interrupted |= bool(answer_flags & NLM_F_DUMP_INTR)
                if answer in (NLMSG_DONE, NLMSG_ERROR):
                    _raise_for(error_code(payload))
                    if interrupted:
                        raise DumpInterrupted("netlink dump interrupted")
                    return
                yield answer, payload

    def _dump(self, kind: int, body: bytes) -> Iterator[memoryview]:
        for _, payload in self._answers(kind, NLM_F_REQUEST | NLM_F_DUMP, body):
            yield payload

    def request(self, kind: int, body: bytes, flags: int = 0) -> list[tuple[int, memoryview]]:
        """Send one request (flags: NLM_F_CREATE, NLM_F_EXCL, NLM_F_REPLACE ...) and wait for
        its ACK; the answers before the ACK (a get's reply). A refusal raises OSError."""
        return list(self._answers(kind, NLM_F_REQUEST | NLM_F_ACK | flags, body))

    def links(self) -> list[Link]:
        return [parse_link(payload) for payload in self._dump(RTM_GETLINK, link_request())]

    def link(self, ifindex: int) -> Link:
        """One link by index; ENODEV when there is none."""
        for kind, payload in self.request(RTM_GETLINK, link_request(ifindex)):
            if kind == RTM_NEWLINK:
                return parse_link(payload)
        raise OSError(errno.ENODEV, f"no RTM_NEWLINK answered for ifindex {ifindex}")

    def addresses(self) -> set[str]:
        """Every IFA_ADDRESS of every interface, IPv4 and IPv6."""
        found = set()
        for payload in self._dump(RTM_GETADDR, IFADDRMSG.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
            family = payload[0]
            address = attributes(payload, IFADDRMSG.size).get(IFA_ADDRESS)
            if address is not None and family in (socket.AF_INET, socket.AF_INET6):
                found.add(socket.inet_ntop(family, bytes(address)))
        return found

    def filters(self, ifindex: int, parent: int) -> list[TcFilter]:
        """The tc filters on one hook (e.g. clsact ingress) of a link."""
        return [
            parse_filter(payload) for payload in self._dump(RTM_GETTFILTER, tc_request(ifindex, 0, parent))
        ]

    def netnsid(self, netns_fd: int) -> int | None:
        """The id this netns gives the netns of an fd (RTM_GETNSID); None when it gave it none."""
        body = RTGENMSG.pack(socket.AF_UNSPEC) + u32_attribute(NETNSA_FD, netns_fd)
        for kind, payload in self.request(RTM_GETNSID, body):
            nsid = attributes(payload, RTGENMSG.size).get(NETNSA_NSID)
            if kind == RTM_NEWNSID and nsid is not None:
                return None if s32(nsid) < 0 else s32(nsid)  # NETNSA_NSID_NOT_ASSIGNED is -1
        return None
