"""Human units in policy files: sizes (``1MiB``), durations (``30s``), rates (``20/s``, ``1MiB/s``).

Each parser raises :class:`ValueError` with a short message; the loader adds the file, line and key.
"""

from __future__ import annotations

import math
import re

#: The textual forms, also written into the policy's JSON Schema (these regular expressions mean the same
#: in Python and in the ECMA-262 dialect JSON Schema uses).
SIZE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s?(B|KiB|MiB|GiB)\s*$"
DURATION_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s?(ms|s|m|h)\s*$"
RATE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$"
BYTE_RATE_PATTERN = r"^\s*(\d+(?:\.\d+)?)\s?(B|KiB|MiB|GiB)\s*/\s*(s|m|h)\s*$"

_SIZE = re.compile(SIZE_PATTERN)
_SIZE_UNITS = {"B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_DECIMAL_SIZE = re.compile(r"^\s*\d+(?:\.\d+)?\s?([kKmMgG][bB]|[kKmMgG])\s*$")
_DURATION = re.compile(DURATION_PATTERN)
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_RATE = re.compile(RATE_PATTERN)
_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(value: object) -> int:
    """Bytes from a non-negative integer or ``"<number><B|KiB|MiB|GiB>"``."""
    if isinstance(value, bool):
        raise ValueError("expected a size like 64KiB or 1MiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError("expected a size like 64KiB or 1MiB")
    match = _SIZE.match(value)
    if match is None:
        if _DECIMAL_SIZE.match(value):
            raise ValueError(f"unknown size unit in {value!r}: use KiB/MiB/GiB (1024-based)")
        raise ValueError(f"expected a size like 64KiB or 1MiB, got {value!r}")
    size = float(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if not math.isfinite(size):
        raise ValueError(f"{value!r} is too large a size")
    if size != int(size):
        raise ValueError(f"{value!r} is not a whole number of bytes")
    return int(size)


def parse_duration(value: object) -> float:
    """Seconds from ``"<number><ms|s|m|h>"``; the bare integer 0 means 0 (off)."""
    if isinstance(value, bool):
        raise ValueError("expected a duration with a unit, like 30s, 5m or 100ms")
    if value == 0 and isinstance(value, int | float):
        return 0.0
    if not isinstance(value, str):
        raise ValueError("expected a duration with a unit, like 30s, 5m or 100ms")
    match = _DURATION.match(value)
    if match is None:
        raise ValueError(f"expected a duration with a unit, like 30s, 5m or 100ms, got {value!r}")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"{value!r} is too long a duration")
    return seconds


def parse_rate(value: object) -> float:
    """Events per second from ``"<number>/<s|m|h>"``, e.g. ``20/s`` or ``600/m``."""
    if not isinstance(value, str):
        raise ValueError("expected a rate like 20/s or 600/m")
    match = _RATE.match(value)
    if match is None:
        raise ValueError(f"expected a rate like 20/s or 600/m, got {value!r}")
    rate = float(match.group(1)) / _PER[match.group(2)]
    if not math.isfinite(rate):
        raise ValueError(f"{value!r} is too high a rate")
    if rate <= 0:
        raise ValueError("a rate must be above zero")
    return rate


def parse_byte_rate(value: object) -> float:
    """Bytes per second from ``"<size>/<s|m|h>"``, e.g. ``1MiB/s``."""
    if not isinstance(value, str) or "/" not in value:
        raise ValueError("expected a byte rate like 1MiB/s")
    size_text, _, per = value.rpartition("/")
    if per.strip() not in _PER:
        raise ValueError(f"expected a byte rate like 1MiB/s, got {value!r}")
    rate = parse_size(size_text.strip()) / _PER[per.strip()]
    if rate <= 0:
        raise ValueError("a rate must be above zero")
    return rate


def format_size(size: int) -> str:
    """Bytes as the largest unit that divides them: ``1MiB``, ``16KiB``, ``100B``."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


def format_duration(seconds: float) -> str:
    """Seconds as a policy duration: ``20s``, ``5m``, ``100ms``; 0 is ``0``."""
    if seconds == 0:
        return "0"
    for unit in ("h", "m", "s"):
        count = seconds / _DURATION_UNITS[unit]
        if count >= 1 and count == int(count):
            return f"{int(count)}{unit}"
    return f"{seconds * 1000:g}ms"


def format_rate(per_second: float) -> str:
    """Events per second as ``N/s`` (or ``N/m`` when that is whole)."""
    if per_second != int(per_second) and (per_second * 60) == int(per_second * 60):
        return f"{int(per_second * 60)}/m"
    return f"{per_second:g}/s"
