"""Benchmarks of egress-top: `sudo make bench` (see bench/__main__.py)."""
