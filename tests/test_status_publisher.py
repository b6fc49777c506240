"""The agent's status file is rewritten when the status changes, and at least every
REWRITE_UNCHANGED_SECONDS when it does not (well within STALE_AFTER_SECONDS)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent import agent_status
from agent.agent_status import (
    REWRITE_UNCHANGED_SECONDS,
    STALE_AFTER_SECONDS,
    AgentStatus,
    StatusPublisher,
)


def status(at: float, **changes: object) -> AgentStatus:
    fields: dict = {
        "pid": 7,
        "started_at": 0.0,
        "updated_at": at,
        "attached_veths": 3,
        "rules": 0,
        "rules_enforced": 0,
    }
    return AgentStatus(**(fields | changes))


def test_an_unchanged_status_is_rewritten_every_few_seconds_a_changed_one_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agent_status, "RUN_DIR", tmp_path)
    written = tmp_path / agent_status.STATUS_NAME

    def updated_at() -> float:
        return json.loads(written.read_text())["updated_at"]

    publish = StatusPublisher()
    publish(status(100.0))
    assert updated_at() == 100.0
    publish(status(101.0))  # the same but for its time: not rewritten yet
    publish(status(100.0 + REWRITE_UNCHANGED_SECONDS - 0.1))
    assert updated_at() == 100.0
    publish(status(102.0, attached_veths=4))  # changed: at once
    assert json.loads(written.read_text())["attached_veths"] == 4
    publish(status(102.0 + REWRITE_UNCHANGED_SECONDS, attached_veths=4))
    assert updated_at() == 102.0 + REWRITE_UNCHANGED_SECONDS
    assert REWRITE_UNCHANGED_SECONDS * 2 < STALE_AFTER_SECONDS  # a reader never sees a live agent stale
