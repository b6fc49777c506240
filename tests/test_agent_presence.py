"""The agent's presence lock: a status reader probing it cannot turn a starting agent away,
and a second agent is still refused."""

from __future__ import annotations

import threading
import time

import pytest

from agent.agent_status import AGENT_LOCK, PROBE_GRACE_SECONDS, agent_presence
from agent.datapath import RUN_DIR
from agent.datapath.lifecycle import is_locked
from agent.errors import UserError

STARTS = 200


def test_an_agent_starts_while_a_reader_probes_its_lock_without_pause() -> None:
    stop = threading.Event()
    probes = 0

    def probe() -> None:  # what `egress-agent status`, egress-block and the tests do
        nonlocal probes
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            is_locked(RUN_DIR / AGENT_LOCK)
            probes += 1

    reader = threading.Thread(target=probe, daemon=True)
    reader.start()
    try:
        for _ in range(STARTS):
            with agent_presence():
                assert is_locked(RUN_DIR / AGENT_LOCK)
    finally:
        stop.set()
        reader.join(timeout=5)
    assert probes > STARTS  # the reader really ran beside every start


def test_a_second_agent_is_refused_once_the_grace_is_over() -> None:
    with agent_presence():
        started = time.monotonic()
        with pytest.raises(UserError, match="another egress-agent is running"), agent_presence():
            pass
        assert time.monotonic() - started >= PROBE_GRACE_SECONDS
    assert not is_locked(RUN_DIR / AGENT_LOCK)
