"""tc clsact attach and detach by rtnetlink (agent/rtnl): needs no loaded program but an fd.

Container egress is the host-side veth's tc ingress hook. Inspection and removal
need nothing loaded, so cleanup works always. The messages are the ones pyroute2 sent
before (same handle, prio, protocol, flags, name), so `tc filter show` reads the same.
"""

from __future__ import annotations

import contextlib
import errno
import socket

from agent.rtnl import DumpInterrupted, Link, RtnlSocket, TcFilter
from agent.rtnl.messages import (
    NLM_F_CREATE,
    NLM_F_EXCL,
    NLM_F_REPLACE,
    RTM_DELQDISC,
    RTM_DELTFILTER,
    RTM_NEWQDISC,
    RTM_NEWTFILTER,
    TCA_BPF_CLASSID,
    TCA_BPF_FD,
    TCA_BPF_FLAG_ACT_DIRECT,
    TCA_BPF_FLAGS,
    TCA_BPF_NAME,
    TCA_KIND,
    TCA_OPTIONS,
    attribute,
    tc_request,
    text_attribute,
    u32_attribute,
)

PROGRAM_NAME = "egress_top_ingress"
# tc filter identity on the clsact ingress hook; "replace" at this prio/handle is atomic.
TC_INGRESS_PARENT = 0xFFFFFFF2
TC_EGRESS_PARENT = 0xFFFFFFF3
TC_FILTER_PRIO = 0xE7
TC_FILTER_HANDLE = 0xE7
CLSACT_PARENT = 0xFFFFFFF1  # TC_H_CLSACT
CLSACT_HANDLE = 0xFFFF0000
ETH_P_ALL = 0x0003
_GONE = (errno.ENODEV, errno.ENOENT, errno.EINVAL)  # the veth vanished: already clean


def _clsact(ifindex: int) -> bytes:
    return tc_request(ifindex, CLSACT_HANDLE, CLSACT_PARENT) + text_attribute(TCA_KIND, "clsact")


def _our_slot(ifindex: int) -> bytes:
    """Our filter's tcmsg and kind: ingress, TC_FILTER_PRIO, every protocol, TC_FILTER_HANDLE."""
    info = TC_FILTER_PRIO << 16 | socket.htons(ETH_P_ALL)
    return tc_request(ifindex, TC_FILTER_HANDLE, TC_INGRESS_PARENT, info) + text_attribute(TCA_KIND, "bpf")


def attach(ifindex: int, program_fd: int, name: str = PROGRAM_NAME) -> None:
    """Put the program on the veth's ingress hook (the container's egress). Another name
    (the bench's trivial program) takes the same slot, so detach() removes it too."""
    options = (
        u32_attribute(TCA_BPF_CLASSID, 1)
        + u32_attribute(TCA_BPF_FD, program_fd)
        + text_attribute(TCA_BPF_NAME, name)
        + u32_attribute(TCA_BPF_FLAGS, TCA_BPF_FLAG_ACT_DIRECT)
    )
    with RtnlSocket() as rtnl:
        try:
            rtnl.request(RTM_NEWQDISC, _clsact(ifindex), NLM_F_CREATE | NLM_F_EXCL)
        except OSError as exc:
            if exc.errno != errno.EEXIST:
                raise
        rtnl.request(
            RTM_NEWTFILTER, _our_slot(ifindex) + attribute(TCA_OPTIONS, options), NLM_F_CREATE | NLM_F_REPLACE
        )


def our_filters() -> dict[int, str]:
    """ifindex -> link name for every link carrying our filter on its ingress hook.
    egress-block asks this on its fast path."""
    found: dict[int, str] = {}
    with RtnlSocket() as rtnl:
        for link in _links(rtnl):
            with contextlib.suppress(OSError):  # gone meanwhile, or no clsact to list
                if any(_is_our_filter(flt) for flt in rtnl.filters(link.index, TC_INGRESS_PARENT)):
                    found[link.index] = link.name
    return found


def _links(rtnl: RtnlSocket, attempts: int = 5) -> list[Link]:
    """A host link dump; links coming and going meanwhile ("dump interrupted") make it
    try again at once, so cleanup never gives up half-way under container churn."""
    for _ in range(attempts - 1):
        try:
            return rtnl.links()
        except DumpInterrupted:
            continue
    return rtnl.links()


def _is_our_filter(flt: TcFilter) -> bool:
    return flt.bpf_name.startswith(PROGRAM_NAME)


def detach(ifindex: int) -> None:
    """Remove the filter in our slot; remove clsact too when nothing else uses it. A veth
    that vanished (container stopped) is already clean, so ENODEV is fine."""
    with RtnlSocket() as rtnl:
        try:
            rtnl.request(RTM_DELTFILTER, _our_slot(ifindex))
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
        try:
            others = [
                flt
                for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT)
                for flt in rtnl.filters(ifindex, parent)
                if flt.kind
            ]
            if not others:
                rtnl.request(RTM_DELQDISC, _clsact(ifindex))
        except OSError as exc:
            if exc.errno not in _GONE:
                raise
