"""What every front end shares: one-line errors and exit codes, logging, stop signals.

Imports nothing of the layers below, so a front end pays only for its own room.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

import click

from agent.errors import UserError

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}


def _setup_logging(prog: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format=f"{prog}: %(message)s",
        stream=sys.stderr,
    )
    # --verbose is about our datapath and inventory, not every HTTP request to dockerd
    for chatty in ("urllib3", "docker"):
        logging.getLogger(chatty).setLevel(logging.WARNING)


# Every way of being asked to stop: kill, a terminal that closes (SSH drop, tmux window
# killed), SIGQUIT (Ctrl-backslash), and the reader of a --json pipe going away.
_STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """A stop signal unwinds like Ctrl-C, so every finally-block (detach, restore terminal)
    runs. Only the first one raises: a second (SIGHUP then SIGTERM as a terminal closes)
    must not cut the cleanup short."""
    stopping = False

    def handler(_signum: int, _frame: Any) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            raise KeyboardInterrupt

    previous = {sig: signal.signal(sig, handler) for sig in _STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


def reports_errors(prog: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn UserError into one stderr line and its exit code (detail only with --verbose)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            verbose = kwargs.get("verbose", False)
            _setup_logging(prog, verbose)
            try:
                with _sigterm_exits():
                    return command(*args, **kwargs)
            except UserError as exc:
                click.echo(f"{prog}: {exc}", err=True)
                if verbose and exc.detail:
                    click.echo(exc.detail, err=True)
                sys.exit(exc.exit_code)
            except (KeyboardInterrupt, BrokenPipeError):
                # Ctrl-C, a stop signal, or the reader of stdout left (egress-top --json | head):
                # asked to stop; the finally-blocks cleaned up
                _silence_stdout_if_broken()
                sys.exit(0)

        return wrapper

    return decorate


def _silence_stdout_if_broken() -> None:
    """A closed pipe must not turn the clean exit into exit 120 when Python flushes stdout."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


verbose_option = click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Debug logs, and the loader's log when the kernel refuses the program.",
)
