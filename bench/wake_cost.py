"""A control for the agent's CPU figure: what this machine charges a process for waking.

A fixed piece of work, of the kinds an agent's refresh does (numpy sorting and searching
flow keys, a Python loop), is timed back to back, then once a second after sleeping, in the
same run as the agent. On a machine where the two agree, an agent's CPU is its work; on one
where the host takes an idle guest's pages or caches away (seen on this project's VM: 3 to
30 times the back-to-back cost, the more the idler the machine), every refresh after a
second's sleep pays that too, whatever the agent does. CPU time from
CLOCK_THREAD_CPUTIME_ID, kernel time included.

`python -m bench.wake_cost SECONDS` prints the figures as JSON.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

from bench.common import spread

KEYS, TABLE_ROWS = 2_000, 100_000  # moved flows looked up in a table of known flows, as a refresh does
BACK_TO_BACK = 50


def reference_work(moved: np.ndarray, known: np.ndarray) -> int:
    distinct = np.unique(moved)
    np.searchsorted(known, distinct)
    return sum(number * number for number in range(KEYS))


def cpu_ms(moved: np.ndarray, known: np.ndarray) -> float:
    started = time.thread_time_ns()
    reference_work(moved, known)
    return (time.thread_time_ns() - started) / 1e6


def wake_cost(seconds: int) -> dict[str, object]:
    rng = np.random.default_rng(11)
    moved = rng.integers(0, 256, (KEYS, 40), dtype=np.uint8).view("S40").ravel()
    known = np.sort(rng.integers(0, 256, (TABLE_ROWS, 40), dtype=np.uint8).view("S40").ravel())
    cpu_ms(moved, known)  # imports and first-call set-up out of the way
    hot = spread([cpu_ms(moved, known) for _ in range(BACK_TO_BACK)])
    woken = []
    for _ in range(seconds):
        time.sleep(1.0)
        woken.append(cpu_ms(moved, known))
    return {"back_to_back_ms": hot, "after_a_second_asleep_ms": spread(woken)}


if __name__ == "__main__":
    print(json.dumps(wake_cost(int(sys.argv[1]))))
