"""Parsing and printing of the value forms config keys share: sizes, CPU amounts, CPU lists.

Parsers raise ``BadValue`` with the problem only; ``keys.parse_value`` adds the key's name
and its accepted form, so every message has the same shape.
"""

from __future__ import annotations

import math
import re

# Binary units only: memory and disk sizes are powers of two in the kernel, and "512M"
# meaning 512000000 bytes would surprise everyone who reads a cgroup file afterwards.
SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
# cgroup files hold signed 64-bit numbers; anything larger is a typo, not a limit.
MAX_SIZE = (1 << 63) - 1
# The kernel's NR_CPUS cannot exceed 8192; a bound keeps "0-999999999" from building a huge set.
MAX_CPU = 8191

_SIZE = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*([kmgtp]?)(i?b)?", re.IGNORECASE)
_CPU = re.compile(r"(\d+(?:\.\d+)?|\.\d+)\s*(%?)")
_CPU_RANGE = re.compile(r"(\d+)(?:-(\d+))?")


class BadValue(ValueError):
    """A value that does not parse; ``hint`` replaces the key's accepted form when set."""

    def __init__(self, problem: str, hint: str | None = None):
        super().__init__(problem)
        self.problem = problem
        self.hint = hint


def _shown(raw: object) -> str:
    return repr(raw) if isinstance(raw, str) else repr(str(raw))


def _number(raw: object) -> float | int | None:
    """A real int/float (not bool, not nan/inf), or None."""
    if isinstance(raw, bool) or not isinstance(raw, int | float):
        return None
    if isinstance(raw, float) and not math.isfinite(raw):
        return None
    return raw


def parse_int(raw: object) -> int:
    number = _number(raw)
    if number is not None:
        if isinstance(number, float) and not number.is_integer():
            raise BadValue(f"invalid number {_shown(raw)}")
        return int(number)
    if isinstance(raw, str) and re.fullmatch(r"\s*-?\d+\s*", raw):
        return int(raw)
    raise BadValue(f"invalid number {_shown(raw)}")


def parse_size(raw: object) -> int:
    """Bytes from 1024, "64K", "512M", "512MiB", "512MB", "1.5G", "1T" (all base 1024)."""
    number = _number(raw)
    if number is not None:
        if number < 0:
            raise BadValue(f"negative size {_shown(raw)}")
        if isinstance(number, float) and not number.is_integer():
            raise BadValue(f"invalid size {_shown(raw)}")
        value = int(number)
    elif isinstance(raw, str):
        text = raw.strip()
        if text.startswith("-") and _SIZE.fullmatch(text[1:].strip()):
            raise BadValue(f"negative size {_shown(raw)}")
        match = _SIZE.fullmatch(text)
        if not match:
            raise BadValue(f"invalid size {_shown(raw)}")
        digits, unit, _ = match.groups()
        scale = SIZE_UNITS[unit.upper()]
        # Exact arithmetic: 1.5G must be 1610612736, not whatever a float rounds it to.
        whole, _, frac = digits.partition(".")
        numerator = int(whole or "0") * 10 ** len(frac) + int(frac or "0")
        value, remainder = divmod(numerator * scale, 10 ** len(frac))
        if remainder:
            raise BadValue(f"invalid size {_shown(raw)} (not a whole number of bytes)")
    else:
        raise BadValue(f"invalid size {_shown(raw)}")
    if value > MAX_SIZE:
        raise BadValue(f"size {_shown(raw)} is too large")
    return value


def size_to_str(value: int) -> str:
    """The shortest exact form: 268435456 -> "256M", 1610612736 -> "1.5G", 1000 -> "1000".

    Exact so that parse_size(size_to_str(n)) == n: a value shown by `config show` can be
    pasted back into `kamra set` unchanged.
    """
    for unit in ("P", "T", "G", "M", "K"):
        scale = SIZE_UNITS[unit]
        if value >= scale and (value * 100) % scale == 0:
            whole, hundredths = divmod(value * 100 // scale, 100)
            if hundredths == 0:
                return f"{whole}{unit}"
            return f"{whole}.{hundredths:02d}".rstrip("0") + unit
    return str(value)


def parse_cpu_amount(raw: object) -> float:
    """Cores from 0.5, 2, "1.5" or "150%", rounded to thousandths of a core."""
    number = _number(raw)
    if number is not None:
        if number < 0:
            raise BadValue(f"negative CPU amount {_shown(raw)}")
        cores = float(number)
    elif isinstance(raw, str):
        text = raw.strip()
        if text.startswith("-") and _CPU.fullmatch(text[1:].strip()):
            raise BadValue(f"negative CPU amount {_shown(raw)}")
        match = _CPU.fullmatch(text)
        if not match:
            raise BadValue(f"invalid CPU amount {_shown(raw)}")
        cores = float(match.group(1)) / (100 if match.group(2) else 1)
    else:
        raise BadValue(f"invalid CPU amount {_shown(raw)}")
    # A millicore is finer than any quota the scheduler enforces over a 100 ms period,
    # and rounding here makes cpu_to_str exact.
    return round(cores, 3)


def cpu_to_str(cores: float) -> str:
    return f"{cores:.3f}".rstrip("0").rstrip(".")


def parse_cpu_list(raw: object) -> tuple[int, ...]:
    """CPU numbers from "0", "0-1", "0,2-3" (the kernel's cpuset list format), sorted, unique."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        raw = str(raw)
    if not isinstance(raw, str) or not raw.strip():
        raise BadValue(f"invalid CPU list {_shown(raw)}")
    cpus: set[int] = set()
    for part in raw.split(","):
        match = _CPU_RANGE.fullmatch(part.strip())
        if not match:
            raise BadValue(f"invalid CPU list {_shown(raw)}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise BadValue(f"invalid CPU range {part.strip()!r} in {_shown(raw)} (end before start)")
        if last > MAX_CPU:
            raise BadValue(f"CPU {last} in {_shown(raw)} is beyond any machine's CPU numbers")
        cpus.update(range(first, last + 1))
    return tuple(sorted(cpus))


def cpu_list_to_str(cpus: tuple[int, ...] | list[int] | set[int] | frozenset[int]) -> str:
    """(0, 1, 2, 5) -> "0-2,5": consecutive CPUs merge into ranges, as the kernel prints them."""
    parts: list[str] = []
    ordered = sorted(cpus)
    i = 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1] == ordered[j] + 1:
            j += 1
        parts.append(str(ordered[i]) if i == j else f"{ordered[i]}-{ordered[j]}")
        i = j + 1
    return ",".join(parts)
