"""tc clsact attach and detach by netlink (pyroute2): needs no loaded program but an fd.

Container egress is the host-side veth's tc ingress hook. Inspection and removal
need nothing loaded, so cleanup works always; inspection reads a raw dump
(agent/rtnl_dump.py), without pyroute2's import cost.
"""

from __future__ import annotations

import contextlib
import errno

from agent.rtnl_dump import DumpInterrupted, Link, RtnlSocket, TcFilter

PROGRAM_NAME = "egress_top_ingress"
# tc filter identity on the clsact ingress hook; "replace" at this prio/handle is atomic.
TC_INGRESS_PARENT = 0xFFFFFFF2
TC_EGRESS_PARENT = 0xFFFFFFF3
TC_FILTER_PRIO = 0xE7
TC_FILTER_HANDLE = 0xE7
_GONE = (errno.ENODEV, errno.ENOENT, errno.EINVAL)  # the veth vanished: already clean


def attach(ifindex: int, program_fd: int, name: str = PROGRAM_NAME) -> None:
    """Put the program on the veth's ingress hook (the container's egress). Another name
    (the bench's trivial program) takes the same slot, so detach() removes it too."""
    from agent.netlink import IPRoute, NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
        ipr.tc(
            "replace-filter",
            "bpf",
            ifindex,
            TC_FILTER_HANDLE,
            fd=program_fd,
            name=name,
            parent=TC_INGRESS_PARENT,
            prio=TC_FILTER_PRIO,
            classid=1,
            direct_action=True,
        )


def our_filters() -> dict[int, str]:
    """ifindex -> link name for every link carrying our filter on its ingress hook.
    Read by a raw dump (agent/rtnl_dump.py): egress-block asks this on its fast path."""
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
    """Remove our filter; remove clsact too when nothing else uses it. A veth that
    vanished (container stopped) is already clean, so ENODEV is fine."""
    from agent.netlink import IPRoute, NetlinkError

    with IPRoute() as ipr:
        try:
            ipr.tc(
                "del-filter", "bpf", ifindex, TC_FILTER_HANDLE, parent=TC_INGRESS_PARENT, prio=TC_FILTER_PRIO
            )
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise
        try:
            others = [
                f
                for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT)
                for f in ipr.get_filters(index=ifindex, parent=parent)
                if f.get_attr("TCA_KIND")
            ]
            if not others:
                ipr.tc("del", "clsact", ifindex)
        except NetlinkError as exc:
            if exc.code not in _GONE:
                raise
