"""Reads of the flow table for the flows layer: only what moved, the whole table when due.

The datapath announces a flow's key in the moved_flows ring buffer the first time the
flow moves in an epoch; the reader bumps the epoch, takes the announced keys and looks
up just those flows: at 100,000 flows with 1% moving that is a hundredth of a full
read. The whole table is read the first time (the aggregator's baseline), after the
ring buffer lost announcements (then only a full read tells everything that moved),
when the aggregator must forget evicted keys, and in every process but one: the ring
buffer has a single consumer position, so the process that holds the consumer lock
reads moved keys and any other front end beside it reads the whole table. Each veth's
flow share (new flows it may create before its overflow flow counts the rest) is per
epoch, so every reader bumps the epoch once per refresh.

A flow announced in the epoch a read bumped to (its first packet came between the bump
and the read) is not announced again when it moves after the read, until the next bump:
the next read looks it up all the same, or the packets it sent last would never be read.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

import numpy as np

from agent.datapath import RUN_DIR, Maps
from agent.datapath.layouts import FLOW_KEY_DTYPE, distinct_keys, joined, take
from agent.flows import TableRead
from agent.lockfile import open_private, private_dir

CONSUMER_LOCK = "moved-flows.lock"
# A lookup per moved flow (by the lookup program, agent/datapath/flow_lookup.py, or a
# syscall each on older kernels): a batched read of the whole table costs less once more
# than this share of it moved.
MOVED_SHARE_FOR_A_FULL_READ = 1 / 8
# Timestamps are CLOCK_MONOTONIC_COARSE, up to a tick behind CLOCK_MONOTONIC: a read is
# taken to start that much earlier, so a packet counted just after it starts is not missed.
CLOCK_MONOTONIC_COARSE = 6  # linux/time.h; the time module does not name it
COARSE_CLOCK_SLACK_NS = int(2 * time.clock_getres(CLOCK_MONOTONIC_COARSE) * 1e9)


class FlowTableReader:
    def __init__(self, maps: Maps, run_dir: Path = RUN_DIR):
        self.maps = maps
        self._consumer_fd = _take_consumer_lock(run_dir)
        self._baseline_taken = False
        # flows the last read found moved in the epoch it bumped to: see the module's doc
        self._moved_in_read_epoch = np.empty(0, FLOW_KEY_DTYPE)

    @property
    def reads_moved_keys(self) -> bool:
        return self._consumer_fd is not None

    def close(self) -> None:
        if self._consumer_fd is not None:
            os.close(self._consumer_fd)
            self._consumer_fd = None

    def read(self, full_read_wanted: bool) -> TableRead:
        """This interval's read, with each veth's exact totals."""
        # Epoch first: a flow moving after the drain is announced again for the next read. Every
        # reader bumps it, consumer or not: each veth's flow share is counted per epoch.
        epoch = self.maps.bump_epoch()
        moved, lost = self.maps.read_moved_keys() if self.reads_moved_keys else (None, 0)
        if moved is not None and len(self._moved_in_read_epoch):
            moved = distinct_keys(joined([moved, self._moved_in_read_epoch]))
        complete = (
            moved is None
            or full_read_wanted
            or not self._baseline_taken
            or len(moved) > self.maps.flow_table_size * MOVED_SHARE_FOR_A_FULL_READ
        )
        read = self.maps.read_flows() if complete else self.maps.lookup_flows(moved)
        self._baseline_taken = True
        if self.reads_moved_keys:
            self._moved_in_read_epoch = take(read.keys, read.stats["epoch"] == epoch)
        return TableRead(
            keys=read.keys,
            stats=read.stats,
            monotonic_ns=read.monotonic_ns,
            table_size=self.maps.flow_table_size,
            flows_created=self.maps.flows_created(),
            read_started_ns=read.started_ns - COARSE_CLOCK_SLACK_NS,
            endpoint_totals=self.maps.read_endpoint_totals(),
            complete=complete,
            moved_lost=lost,
        )


def _take_consumer_lock(run_dir: Path) -> int | None:
    """The moved_flows consumer lock's fd, or None when another process holds it."""
    fd = open_private(private_dir(run_dir) / CONSUMER_LOCK)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd
