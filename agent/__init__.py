"""egress-top: eBPF egress observability and enforcement for Docker hosts."""

__version__ = "0.1.0"
