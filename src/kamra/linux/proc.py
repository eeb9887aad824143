"""Facts about processes read from /proc."""

from __future__ import annotations

import os


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone.

    Stored beside a pid so that a reused pid is never mistaken for the process we started.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may contain spaces and parentheses: fields start after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    """True when ``pid`` runs and is the very process that started at ``started``."""
    if not pid:
        return False
    now = start_time(pid)
    if now is None:
        return False
    if started is not None and now != started:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        state = data[data.rindex(b")") + 2:].split()[0]
    except OSError:
        return False
    return state != b"Z"


def ns_inode(pid: int | str, ns: str) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/{ns}").st_ino
    except OSError:
        return None


def status_fields(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


def cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [os.fsdecode(part) for part in raw.split(b"\0") if part]
