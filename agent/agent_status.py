"""The running agent's health, published as a small root-only file for `egress-agent status`.

A file and not a socket: the agent rewrites it as it changes and at least every few
seconds (atomically, 0600 in the 0700 runtime directory), and a reader needs no live
agent to learn that there is none: an absent file, an unlocked agent lock or a stale
time all say so. The agent holds AGENT_LOCK for its whole life and the kernel drops it
however the agent ends; a pid would not do, since an agent in a Swarm task has a pid of
its own namespace.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from agent.datapath import RUN_DIR
from agent.datapath.lifecycle import is_locked
from agent.errors import EXIT_USAGE, UserError
from agent.lockfile import LockBusy, bounded_lock, open_private, private_dir

STATUS_NAME = "agent-status.json"
PROBE_GRACE_SECONDS = 0.5  # see agent_presence
AGENT_LOCK = "agent.lock"
STALE_AFTER_SECONDS = 15.0  # several missed intervals: the agent is stuck
REWRITE_UNCHANGED_SECONDS = 5.0  # an unchanged status is rewritten this often: its time says "alive"


@dataclass(frozen=True)
class AgentStatus:
    pid: int  # in the agent's own pid namespace
    started_at: float  # wall clock
    updated_at: float
    attached_veths: int
    rules: int
    rules_enforced: int  # rules whose container is running and enforced on every veth
    containers_enforced: list[str] = field(default_factory=list)
    not_enforced: dict[str, str] = field(default_factory=dict)  # container -> why
    refresh_retries: int = 0
    refresh_failures: int = 0
    last_failure: str = ""

    @property
    def healthy(self) -> bool:
        return not self.not_enforced and time.time() - self.updated_at < STALE_AFTER_SECONDS


def status_path() -> Path:
    return RUN_DIR / STATUS_NAME


def publish(status: AgentStatus) -> None:
    path = status_path()
    private_dir(path.parent)
    scratch = path.with_name(f".{STATUS_NAME}.{os.getpid()}")
    fd = open_private(scratch, os.O_WRONLY | os.O_TRUNC)
    with os.fdopen(fd, "w") as out:
        json.dump(asdict(status), out)
    os.replace(scratch, path)


class StatusPublisher:
    """publish() for the agent's loop: a status that differs from the last one written only by
    its time is written again once REWRITE_UNCHANGED_SECONDS have passed, not every interval
    (a file written and renamed in /run each second was a tenth of the idle agent's CPU).
    Readers take it as live until STALE_AFTER_SECONDS, well past that."""

    def __init__(self) -> None:
        self._written: AgentStatus | None = None

    def __call__(self, status: AgentStatus) -> None:
        last = self._written
        if (
            last is not None
            and status.updated_at - last.updated_at < REWRITE_UNCHANGED_SECONDS
            and replace(status, updated_at=last.updated_at) == last
        ):
            return
        publish(status)
        self._written = status


def withdraw() -> None:
    status_path().unlink(missing_ok=True)


@contextlib.contextmanager
def agent_presence() -> Iterator[None]:
    """Held for the agent's life; a second agent is refused (two would fight over the veths).
    is_locked() probes the lock by taking it shared for an instant, so a refusal waits out
    PROBE_GRACE_SECONDS first: a status reader polling at the agent's start must not turn
    it away; an agent holds the lock for its whole life, far longer."""
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(
                bounded_lock(private_dir(RUN_DIR) / AGENT_LOCK, "the agent lock", timeout=PROBE_GRACE_SECONDS)
            )
        except LockBusy:
            running = read_live()
            holder = f" (pid {running.pid})" if running else ""
            raise UserError(f"another egress-agent is running{holder}: stop it first", EXIT_USAGE) from None
        yield


def read_live() -> AgentStatus | None:
    """The status of a running agent, or None when none runs (a crashed one's file is ignored)."""
    if not is_locked(RUN_DIR / AGENT_LOCK):
        return None
    try:
        return AgentStatus(**json.loads(status_path().read_text()))
    except (OSError, ValueError, TypeError):
        return None
