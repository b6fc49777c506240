"""A child that does not stop in time is killed, and the failure says where it was stuck."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bench.agent_process import AgentFailed, stop_child

DEAF = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(1, flush=True)\ntime.sleep(60)\n"


def test_a_child_deaf_to_sigterm_is_aborted_with_its_stacks_then_reaped() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", DEAF],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    assert proc.stdout is not None and proc.stdout.readline() == "1\n"  # its handler is in place
    with pytest.raises(AgentFailed, match="did not exit within 0 s of signal") as failure:
        stop_child(proc, "deaf child", timeout=0.5, said=proc.stderr.read)
    assert 'File "<string>", line 4' in str(failure.value)  # faulthandler: stuck in time.sleep
    assert proc.returncode is not None
