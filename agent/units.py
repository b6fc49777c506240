"""Human units, as network tools print them: rates in bits (SI), sizes in bytes (IEC)."""

from __future__ import annotations

SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def format_bits_per_second(bytes_per_second: float) -> str:
    bits = bytes_per_second * 8
    for unit in ("b/s", "Kb/s", "Mb/s", "Gb/s"):
        if bits < 1000 or unit == "Gb/s":
            return f"{bits:.0f} {unit}" if unit == "b/s" else f"{bits:.1f} {unit}"
        bits /= 1000
    raise AssertionError("unreachable")


def format_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if count < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_rate(per_second: float) -> str:
    """Packets (or anything) per second: 3 significant digits, k/M above a thousand."""
    if per_second < 1000:
        return f"{per_second:.0f}" if per_second >= 10 or per_second == 0 else f"{per_second:.1f}"
    if per_second < 1_000_000:
        return f"{per_second / 1000:.1f}k"
    return f"{per_second / 1_000_000:.1f}M"


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def sparkline(values: tuple[float, ...] | list[float], width: int) -> str:
    """The last `width` values scaled to the window's max; an idle window is all ▁."""
    window = list(values)[-width:]
    peak = max(window, default=0)
    if peak <= 0:
        return SPARK_BLOCKS[0] * len(window)
    top = len(SPARK_BLOCKS) - 1
    return "".join(SPARK_BLOCKS[round(v / peak * top)] for v in window)
