"""Link events: the kernel's RTMGRP_LINK multicast of RTM_NEWLINK and RTM_DELLINK.

A burst (200 containers starting at once) must fit the socket's receive buffer; when it
does not, the kernel drops what did not fit and the next recv raises ENOBUFS: the
events are lost, and the caller must read the current state again (a full refresh).
"""

from __future__ import annotations

import socket

from agent.rtnl.messages import (
    NLMSGHDR,
    RTM_DELLINK,
    RTM_NEWLINK,
    RTMGRP_LINK,
    Link,
    aligned,
    parse_link,
)
from agent.rtnl.route import RouteSocket

SO_RCVBUFFORCE = 33  # linux/socket.h; the socket module does not name it
_RECV_BYTES = 1 << 16  # the kernel multicasts one link message per datagram


class LinkEvents(RouteSocket):
    """A NETLINK_ROUTE socket that joined RTMGRP_LINK, in the netns of the thread opening it."""

    def __init__(self, receive_buffer: int):
        super().__init__()
        try:
            # Beyond net.core.rmem_max, which caps SO_RCVBUF (212992 by default): needs CAP_NET_ADMIN.
            self._socket.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, receive_buffer)
        except PermissionError:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self._socket.bind((0, RTMGRP_LINK))

    def read(self) -> list[tuple[Link, bool]]:
        """(link, removed) of each event in the next datagram; blocks until one arrives.
        OSError ENOBUFS: events were dropped since the last read."""
        view = memoryview(self._socket.recv(_RECV_BYTES))
        events = []
        offset = 0
        while offset + NLMSGHDR.size <= len(view):
            length, kind, _flags, _seq, _pid = NLMSGHDR.unpack_from(view, offset)
            if length < NLMSGHDR.size:
                break
            if kind in (RTM_NEWLINK, RTM_DELLINK):
                events.append(
                    (parse_link(view[offset + NLMSGHDR.size : offset + length]), kind == RTM_DELLINK)
                )
            offset += aligned(length)
        return events
