"""Datapath layer: the only code that talks to BPF and tc.

Rooms, one job each: syscalls (raw bpf(2)), maps (pinned maps: flow_maps the flow
table, its cache and the moved flows, policy_maps endpoints and rules), attach (tc clsact),
program (which build is pinned; loading it from the cache or in a child), loader (BCC
compile/load/pin, imported only by that short-lived child), program_cache (the compiled
program on disk, keyed by source and kernel), cached_load (loading it by raw bpf(2)),
lifecycle (runtime dir, holders, locks, cleanup), system (capabilities, bpffs), headers
(kernel headers for the loader).

This package imports neither the loader nor BCC: nothing of LLVM stays resident.
numpy loads only with layouts (the bulk flow and counter reads), so a process that
only writes policy (egress-block's fast path) starts without it.
"""

from agent.datapath.attach import PROGRAM_NAME, detach, our_filters
from agent.datapath.flow_maps import FlowTableRead
from agent.datapath.lifecycle import (
    RUN_DIR,
    cleanup_everything,
    exclusive,
    live_holders,
    open_datapath,
    release_if_unheld,
    remove_pins,
    start_loading,
)
from agent.datapath.maps import (
    DEFAULT_FLOW_TABLE_SIZE,
    PIN_DIR,
    POLICY_TABLE_SIZE,
    EndpointTotals,
    IfindexCounters,
    Maps,
    PinnedMap,
    open_pinned_maps,
    pins_exist,
)
from agent.datapath.policy_maps import RuleHits
from agent.datapath.program import Datapath
from agent.datapath.system import check_privileges, ensure_bpffs


def __getattr__(name: str) -> object:
    """FLOW_KEY_DTYPE and FLOW_STATS_DTYPE load numpy: only for those who ask (maps.py)."""
    if name in ("FLOW_KEY_DTYPE", "FLOW_STATS_DTYPE"):
        from agent.datapath import layouts

        return getattr(layouts, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_FLOW_TABLE_SIZE",
    "FLOW_KEY_DTYPE",
    "FLOW_STATS_DTYPE",
    "PIN_DIR",
    "POLICY_TABLE_SIZE",
    "PROGRAM_NAME",
    "RUN_DIR",
    "Datapath",
    "EndpointTotals",
    "FlowTableRead",
    "IfindexCounters",
    "Maps",
    "PinnedMap",
    "RuleHits",
    "check_privileges",
    "cleanup_everything",
    "detach",
    "ensure_bpffs",
    "exclusive",
    "live_holders",
    "open_datapath",
    "open_pinned_maps",
    "our_filters",
    "pins_exist",
    "release_if_unheld",
    "remove_pins",
    "start_loading",
]
