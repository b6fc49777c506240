"""Root-only state on disk: private directories, private files, bounded file locks.

Shared by the datapath's runtime directory and the rule store. Every wait on a lock
ends within a bound, and the error names the process that held it: a lock that
anyone else could take, or that hangs a root command forever, would let an
unprivileged user stall enforcement.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

from agent.errors import EXIT_PERMISSION, EXIT_STORE, UserError

LOCK_TIMEOUT_ENV = "EGRESS_TOP_LOCK_TIMEOUT"
DEFAULT_LOCK_TIMEOUT = 5.0
_POLL_SECONDS = 0.01


class LockBusy(UserError):
    """A lock stayed held past the bound; the message names its holder."""

    def __init__(self, reason: str, holder_pid: int | None):
        super().__init__(f"{reason}; try again when it finishes", EXIT_STORE)
        self.reason = reason  # without the advice, for callers that know better what to do
        self.holder_pid = holder_pid


def lock_timeout() -> float:
    """Seconds any one wait on a lock may last (EGRESS_TOP_LOCK_TIMEOUT overrides)."""
    text = os.environ.get(LOCK_TIMEOUT_ENV)
    if not text:
        return DEFAULT_LOCK_TIMEOUT
    try:
        return max(0.0, float(text))
    except ValueError:
        raise UserError(f"{LOCK_TIMEOUT_ENV}={text!r} is not a number of seconds", EXIT_STORE) from None


def private_dir(path: Path, owner: int = 0) -> Path:
    """Make (or check) a directory only its owner (root) may enter: 0700, not a symlink."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except PermissionError as exc:
        raise UserError(f"cannot create {path}: permission denied; run as root", EXIT_PERMISSION) from exc
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path} is not a directory (a symlink?): remove it and try again", EXIT_PERMISSION)
    if info.st_uid != owner:
        raise UserError(
            f"{path} is owned by uid {info.st_uid}, not {owner}: remove it and try again", EXIT_PERMISSION
        )
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(path, 0o700)  # left by an older version, or made by hand
    return path


def open_private(path: Path, flags: int = os.O_RDWR) -> int:
    """Open or create a 0600 regular file without following a symlink at its name."""
    try:
        fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # O_NOFOLLOW met a symlink at the name, planted or not
            raise UserError(f"{path} is a symlink: remove it and try again", EXIT_PERMISSION) from exc
        raise
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise UserError(f"{path} is not a regular file: remove it and try again", EXIT_PERMISSION)
    if stat.S_IMODE(info.st_mode) != 0o600:
        os.fchmod(fd, 0o600)
    return fd


@contextlib.contextmanager
def bounded_lock(
    path: Path, what: str, exclusive: bool = True, timeout: float | None = None
) -> Iterator[None]:
    """flock path for the with-block, waiting at most timeout seconds.

    An exclusive holder writes its pid into the file, so a waiter that gives up can
    say who held it. Shared holders only read, so the pid named is the last writer's."""
    timeout = lock_timeout() if timeout is None else timeout
    fd = open_private(path, os.O_RDWR)
    try:
        operation = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = _recorded_pid(fd)
                    by = f"pid {holder}" if holder else "another process"
                    raise LockBusy(
                        f"{what} stayed locked by {by} for {timeout:g}s ({path})", holder
                    ) from None
                time.sleep(_POLL_SECONDS)
        if exclusive:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _recorded_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
