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


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(num_bytes: float | None) -> str:
    """Bytes in binary units with three significant figures: ``512B``, ``1.50GiB``."""
    if num_bytes is None:
        return MISSING
    value = float(num_bytes)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{value:.0f}B"
            return f"{value:.3g}{unit}"
        value /= 1024
    raise AssertionError("unreachable")


def compact(num_bytes: float | None) -> str:
    """Bytes in at most five characters for narrow table cells: ``512``, ``36.2K``, ``1.50G``."""
    if num_bytes is None:
        return MISSING
    text = size(num_bytes)
    return text[:-1] if text.endswith("B") and not text.endswith("iB") else text.replace("iB", "")


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
