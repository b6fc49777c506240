"""The agent's --export file: append-only NDJSON, reopened on SIGHUP, optionally rotated by size.

Records are only ever written whole, one interval at a time, and the file is reopened or
rotated only between two intervals. So however it is rotated, by logrotate (rename, then
SIGHUP from postrotate) or by --export-max-mb, every line of every file is one whole
record, and the records written between the rename and the SIGHUP land, whole, in the
renamed file. copytruncate must not be used: it loses what is written between its copy
and its truncate.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TextIO

# 0640: flow records say who talks to whom; the group may read them, others not
EXPORT_FILE_MODE = 0o640


def _open_for_append(path: Path) -> TextIO:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, EXPORT_FILE_MODE)
    return os.fdopen(fd, "a")


class ExportFile:
    """Call writer() before each interval's write: it applies a pending reopen or rotation first."""

    def __init__(self, path: Path, max_bytes: int | None = None, keep: int = 5):
        self.path = path
        self.max_bytes = max_bytes
        self.keep = keep
        self._reopen_requested = False
        self._out = _open_for_append(path)

    def request_reopen(self) -> None:
        """Safe from a signal handler: only sets a flag; the reopen waits for the next interval."""
        self._reopen_requested = True

    def writer(self) -> TextIO:
        if self.max_bytes is not None and self._out.tell() >= self.max_bytes:
            self._out.close()
            self._rotate()
            self._out = _open_for_append(self.path)
        elif self._reopen_requested:
            self._out.close()
            self._out = _open_for_append(self.path)
        self._reopen_requested = False
        return self._out

    def _rotate(self) -> None:
        """flows.ndjson -> flows.ndjson.1 -> ... -> .KEEP (logrotate's names); the oldest goes."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._numbered(self.keep))
        for number in range(self.keep - 1, 0, -1):
            with contextlib.suppress(FileNotFoundError):
                os.replace(self._numbered(number), self._numbered(number + 1))
        with contextlib.suppress(FileNotFoundError):  # moved away by someone else: just reopen
            os.replace(self.path, self._numbered(1))

    def _numbered(self, number: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{number}")

    def close(self) -> None:
        self._out.close()
