"""agent/inventory_watch.py when the kernel drops link events (ENOBUFS): the watcher counts
a retry, refreshes the inventory (what the lost events would have said) and follows new
link events on a reopened socket. Real kernel events in a netns of this test's own, its
watcher threads started there; the Docker side is a quiet stand-in (this is about netlink).
Needs root, not Docker."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from lab import wait_until
from netns_pair import NetnsPair, ip, netns_pair

import agent.inventory_watch as inventory_watch
from agent.model import Inventory
from agent.retry import RetryStats

pytestmark = pytest.mark.system
SMALL_RECEIVE_BUFFER = 32 * 1024  # a start's few events fit, a burst of 40 veth pairs does not
BURST = 40


class QuietEventStream:
    """Docker's event stream with nothing to say: iterating blocks until it is closed."""

    def __init__(self) -> None:
        self._closed = threading.Event()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self._closed.wait()
        return iter(())

    def close(self) -> None:
        self._closed.set()


class CountedSource:
    """The watcher's inventory source: records each snapshot it is asked for (full or not)."""

    def __init__(self) -> None:
        self.snapshots: list[bool] = []
        self.client = SimpleNamespace(events=lambda **_filters: QuietEventStream())

    def snapshot(self, full: bool = False) -> Inventory:
        self.snapshots.append(full)
        return Inventory()

    def forget(self, _container: str) -> None:
        pass


def ip_batch(netns: str, commands: list[str]) -> None:
    subprocess.run(
        ["ip", "-n", netns, "-batch", "-"],
        input="\n".join(commands),
        text=True,
        check=True,
        capture_output=True,
        timeout=60,
    )


@pytest.fixture
def pair() -> Iterator[NetnsPair]:
    with netns_pair() as made:
        yield made


def test_lost_link_events_are_counted_refreshed_and_followed_again(
    pair: NetnsPair, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(inventory_watch, "LINK_EVENTS_RCVBUF", SMALL_RECEIVE_BUFFER)
    reader_held, release = threading.Event(), threading.Event()
    enslaved: list[str] = []

    def on_link(event: inventory_watch.LinkEvent) -> bool:
        enslaved.append(event.name)
        reader_held.set()
        release.wait(10)  # the first event holds the reader: the burst overflows its socket
        return False  # not Docker's bridge: no refresh for the event itself

    source, stats = CountedSource(), RetryStats()
    watcher = inventory_watch.InventoryWatcher(source, on_link, lambda _inventory: None, stats, 3600)  # type: ignore[arg-type]
    ip("-n", pair.a, "link", "add", "ettbr", "type", "bridge")
    pair.run_in(pair.a, watcher.start)  # its threads, the link events' one too, live in netns a
    try:
        assert source.snapshots == [True]
        ip_batch(pair.a, ["link add v0 type veth peer w0", "link set v0 master ettbr"])
        assert reader_held.wait(5)
        ip_batch(
            pair.a,
            [f"link add o{n} type veth peer p{n}" for n in range(BURST)]
            + [f"link set o{n} master ettbr" for n in range(BURST)],
        )
        assert stats.retries == 0
        release.set()
        wait_until(lambda: stats.retries == 1, timeout=5)  # ENOBUFS: "link events" retried
        assert len(enslaved) < 1 + BURST  # events were lost
        wait_until(lambda: len(source.snapshots) >= 2, timeout=5)
        assert source.snapshots[1] is False  # the refresh that makes up for them
        ip_batch(pair.a, ["link add v1 type veth peer w1", "link set v1 master ettbr"])
        wait_until(lambda: "v1" in enslaved, timeout=5)  # the reopened socket follows
        assert stats.retries == 1 and stats.failures == 0
    finally:
        release.set()
        watcher.stop()
