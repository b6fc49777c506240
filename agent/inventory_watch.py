"""Keeps an Inventory current as containers come and go: Docker events, veth link
events, retried refreshes, a periodic reconcile."""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.inventory import DockerInventory
from agent.model import Inventory
from agent.retry import RetryStats, retried
from agent.rtnl import Link, LinkEvents

log = logging.getLogger(__name__)

RECONCILE_SECONDS = 10.0  # lists containers, reads only those whose endpoints or netns changed
FULL_RECONCILE_SECONDS = 300.0  # re-inspects all and re-enters every netns: ~0.3 s of CPU at 200
FAILED_REFRESH_RETRY_SECONDS = 0.5  # after every quick retry failed: try again soon, not at the reconcile
# A start fires a burst of link and Docker events: one refresh after the burst, and not
# while the new veth's owner is being looked up (tagging does not wait for refreshes).
REFRESH_DEBOUNCE_SECONDS = 0.1
LINK_EVENTS_RCVBUF = 4 * 1024 * 1024  # 200 starts at once must not overflow the netlink socket
# Docker events that can change which veth belongs to which container.
INVENTORY_EVENTS = {"start", "restart", "die", "stop", "kill", "destroy", "connect", "disconnect", "create"}


@dataclass(frozen=True)
class LinkEvent:
    """A host-side veth enslaved to a bridge, as one RTM_NEWLINK/RTM_DELLINK reported it."""

    ifindex: int
    name: str
    bridge: str
    peer_netnsid: int | None  # where its peer lives, as the host netns numbers it
    peer_ifindex: int
    removed: bool = False


class InventoryWatcher:
    """Keeps an Inventory current: Docker events, veth link events, periodic reconcile.

    on_link(event) fires on every change of a veth enslaved to a bridge: first when it
    is enslaved, again when its peer moves into the container's netns, both before the
    container's process runs, so the caller can attach and tag it in time; it returns
    whether the bridge is Docker's. on_change(inventory) fires after each refresh. A
    failed refresh is retried at once with backoff, then every
    FAILED_REFRESH_RETRY_SECONDS; the reconcile is only the safety net.
    """

    def __init__(
        self,
        inventory: DockerInventory,
        on_link: Callable[[LinkEvent], bool],
        on_change: Callable[[Inventory], None],
        stats: RetryStats,
        reconcile_seconds: float = RECONCILE_SECONDS,
    ):
        self._source = inventory
        self._on_link = on_link
        self._on_change = on_change
        self.stats = stats
        self._reconcile_seconds = reconcile_seconds
        self._stop = threading.Event()
        self._dirty = threading.Event()
        self._events_stream: Any = None
        self._events_lock = threading.Lock()  # stop() closes the stream the thread opened
        self._wake_read, self._wake_write = -1, -1  # stop() writes: the link thread's select returns
        self._threads: list[threading.Thread] = []
        self.current = Inventory()

    def start(self) -> Inventory:
        self.refresh(full=True)
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC)
        for target, name in (
            (self._follow_docker_events, "docker-events"),
            (self._follow_links, "link-events"),
            (self._refresh_loop, "inventory-refresh"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self.current

    def stop(self) -> None:
        """Wake every thread instead of waiting out its timeout: a front end's exit waits
        for this, so it must take milliseconds, not the link select's or a blocked read's."""
        with self._events_lock:
            self._stop.set()
            stream = self._events_stream
        self._dirty.set()
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()  # shuts its socket down: the blocked read returns at once
        if self._wake_write >= 0:
            os.write(self._wake_write, b"x")
        for thread in self._threads:
            thread.join(timeout=2)
        self._threads.clear()
        for fd in (self._wake_read, self._wake_write):
            if fd >= 0:
                os.close(fd)
        self._wake_read, self._wake_write = -1, -1

    def refresh(self, full: bool = False, only_if_changed: bool = False) -> Inventory:
        """Snapshot and hand on; both read netlink dumps, which fail under churn: retried.
        only_if_changed (the periodic reconcile): an unchanged inventory is not handed on, its
        sync would dump the host's links again for nothing."""

        def attempt() -> Inventory:
            inventory = self._source.snapshot(full=full)
            if not (only_if_changed and inventory == self.current):
                self._on_change(inventory)
            return inventory

        self.current = retried(attempt, "inventory refresh", self.stats)
        return self.current

    def _refresh_loop(self) -> None:
        next_full = time.monotonic() + FULL_RECONCILE_SECONDS
        while not self._stop.is_set():
            triggered = self._dirty.wait(timeout=self._reconcile_seconds)
            if self._stop.is_set():
                return
            if triggered:
                self._stop.wait(REFRESH_DEBOUNCE_SECONDS)
            self._dirty.clear()
            full = not triggered and time.monotonic() >= next_full
            if full:
                next_full = time.monotonic() + FULL_RECONCILE_SECONDS
            try:
                self.refresh(full=full, only_if_changed=not triggered and not full)
            except Exception:  # counted and logged by retried(); the engine may be restarting
                self._stop.wait(FAILED_REFRESH_RETRY_SECONDS)
                self._dirty.set()

    def _follow_docker_events(self) -> None:
        while not self._stop.is_set():
            try:
                stream = self._source.client.events(decode=True, filters={"type": ["container", "network"]})
                with self._events_lock:
                    if self._stop.is_set():  # stop() ran while the stream was opening
                        stream.close()
                        return
                    self._events_stream = stream
                self._dirty.set()  # whatever happened while the stream was down
                for event in stream:
                    action = (event.get("Action") or event.get("status") or "").split(":")[0]
                    if action in INVENTORY_EVENTS:
                        actor = (event.get("Actor") or {}).get("Attributes", {}).get(
                            "container"
                        ) or event.get("id")
                        if actor:
                            self._source.forget(actor)
                        self._dirty.set()
            except Exception as exc:
                if not self._stop.is_set():
                    self.stats.retry("docker event stream")
                    log.warning("docker event stream ended (%s): reconnecting", exc)
                    self._stop.wait(0.2)

    def _follow_links(self) -> None:
        while not self._stop.is_set():
            try:
                with LinkEvents(LINK_EVENTS_RCVBUF) as events:
                    while not self._stop.is_set():
                        ready, _, _ = select.select([events.fileno(), self._wake_read], [], [])
                        if events.fileno() in ready and not self._stop.is_set():
                            for link, removed in events.read():
                                self._handle_link(link, removed)
            except Exception as exc:  # ENOBUFS: events were lost; a refresh finds what they said
                if not self._stop.is_set():
                    self.stats.retry("link events")
                    log.warning("link event socket failed (%s): reopening, refreshing", exc)
                    self._dirty.set()

    def _handle_link(self, link: Link, removed: bool) -> None:
        if link.kind != "veth":
            return
        if removed:
            self._on_link(LinkEvent(link.index, link.name, "", None, 0, removed=True))
            return
        if not link.master:
            return
        try:
            bridge = socket.if_indextoname(link.master)
        except OSError:
            return
        event = LinkEvent(
            ifindex=link.index,
            name=link.name,
            bridge=bridge,
            peer_netnsid=link.peer_netnsid,
            peer_ifindex=link.peer_index,
        )
        try:
            ours = self._on_link(event)
        except Exception as exc:
            log.warning("cannot attach to new veth %s: %s", link.name, exc)
            ours = True
        if ours:
            self._dirty.set()
