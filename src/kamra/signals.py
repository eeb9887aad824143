"""Signal names as users and templates write them (SIGTERM, TERM, SIGRTMIN+3, 15)."""

from __future__ import annotations

import signal

from kamra.errors import InvalidInput


def parse_signal(text: str | int) -> int:
    if isinstance(text, int):
        return text
    value = text.strip().upper()
    if value.isdigit():
        return int(value)
    if not value.startswith("SIG"):
        value = "SIG" + value
    for base, number in (("SIGRTMIN", signal.SIGRTMIN), ("SIGRTMAX", signal.SIGRTMAX)):
        if value.startswith(base):
            rest = value[len(base):]
            if not rest:
                return int(number)
            if rest[0] in "+-" and rest[1:].isdigit():
                return int(number) + int(rest)
    try:
        return int(signal.Signals[value])
    except KeyError:
        raise InvalidInput(f"unknown signal {text!r}: use a name like SIGTERM or SIGRTMIN+3") from None


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        if signal.SIGRTMIN <= number <= signal.SIGRTMAX:
            return f"SIGRTMIN+{number - signal.SIGRTMIN}"
        return str(number)
