"""How sizes, counts and durations are written for people: binary units for bytes (KiB, MiB, GiB),
SI prefixes for counts. One convention for `plan`, progress bars, `cache` and reports; imports nothing."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: float, unit: str = "") -> str:
    for suffix, scale in (("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {suffix}{unit}"
    return f"{int(n)} {unit}".rstrip()


def human_seconds(seconds: float) -> str:
    """A duration as people read it: 0.4 s, 12 s, 3.0 min, 2.5 h, 4.1 days, 3.2 years (a unit is used
    from two of it on)."""
    for unit, scale in (("years", 365 * 86400), ("days", 86400), ("h", 3600), ("min", 60)):
        if seconds >= 2 * scale:
            return f"{seconds / scale:.1f} {unit}"
    return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"


def human_amount(n: int, unit: str) -> str:
    """A job's progress figure: bytes in binary units, anything else counted (1.2 K steps)."""
    return human_bytes(n) if unit == "bytes" else human_count(n, f" {unit}").replace("  ", " ")
