"""Benchmarks: `sudo make bench`. The environment is the test lab (tests/lab.py)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
