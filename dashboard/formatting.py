"""Number and time formatting shared by the TUI and ``megascope status`` (pure Python)."""

from __future__ import annotations

import time

MISSING = "-"


def duration(seconds: float | None) -> str:
    """``59s``, ``4m12s``, ``1h02m``, ``3d04h``: short and fixed in meaning."""
    if seconds is None or seconds < 0:
        return MISSING
    whole = int(round(seconds))
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def seconds(value: float | None) -> str:
    """A short time read to the millisecond: ``66 ms`` under a second, ``1.25 s`` from one (a recovery's parts)."""
    if value is None or value < 0:
        return MISSING
    if value < 0.9995:
        return f"{1000 * value:.0f} ms"
    return f"{value:.2f} s"


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(num_bytes: float | None) -> str:
    """Bytes in binary units, three significant figures, the unit always written: ``512 B``, ``4.98 GiB``.

    The one size formatter of the dashboard and ``megascope status``: every screen says "GiB" for the same
    quantity, never "G" on one screen and "GB" (decimal) on another.
    """
    if num_bytes is None:
        return MISSING
    value = float(num_bytes)
    for unit in _UNITS:
        # 1023.6 KiB would print as "1.02e+03 KiB": move up a unit before three figures round to 1024.
        if abs(value) < 999.5 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{value:.0f} B"
            return f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def size_pair(used: float | None, total: float | None) -> str:
    """``6.70 / 24.0 GiB`` when both are in one unit, else ``512 MiB / 24.0 GiB``."""
    if used is None or total is None:
        return MISSING
    left, right = size(used), size(total)
    unit = right.rsplit(" ", 1)[-1]
    if left.endswith(f" {unit}"):
        return f"{left.rsplit(' ', 1)[0]} / {right}"
    return f"{left} / {right}"


def rate(bytes_per_second: float | None) -> str:
    return MISSING if bytes_per_second is None else f"{size(bytes_per_second)}/s"


def number(value: float | None, digits: int = 0) -> str:
    """Thousands separators: ``13,072``; ``digits`` decimals."""
    return MISSING if value is None else f"{value:,.{digits}f}"


def percent(value: float | None, digits: int = 0) -> str:
    """A value already in 0..100."""
    return MISSING if value is None else f"{value:.{digits}f}%"


def loss(value: float | None) -> str:
    return MISSING if value is None else f"{value:.4f}"


def clock(wall_time: float) -> str:
    """Local time of day, ``HH:MM:SS`` (the event log's column)."""
    return time.strftime("%H:%M:%S", time.localtime(wall_time))
