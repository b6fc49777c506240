"""rtnetlink with the standard library: struct and an AF_NETLINK socket, no pyroute2.

messages: layouts and parsing; route: requests (ACK, errno) and dumps; link_events:
the RTMGRP_LINK multicast.
"""

from agent.rtnl.link_events import LinkEvents
from agent.rtnl.messages import Link, TcFilter
from agent.rtnl.route import DumpInterrupted, RtnlSocket

__all__ = ["DumpInterrupted", "Link", "LinkEvents", "RtnlSocket", "TcFilter"]
