"""Validation of user-supplied names before any path is built from them."""

from __future__ import annotations

import re

from kamra.errors import InvalidInput

# DNS label: what a hostname, a directory name and a cgroup name can all carry safely.
_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}\Z")


def check_name(name: object, kind: str = "container") -> str:
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{kind} name is empty: give a name like 'web1' "
                           "(lowercase letters, digits and '-', at most 63)")
    if not _NAME.match(name):
        shown = name if len(name) <= 70 else name[:67] + "..."
        raise InvalidInput(f"invalid {kind} name {shown!r}: use lowercase letters, digits and '-', "
                           "starting with a letter or digit, at most 63 characters")
    return name


def check_hostname(hostname: str) -> str:
    labels = hostname.split(".")
    if len(hostname) > 64 or not all(_NAME.match(label.lower()) for label in labels):
        raise InvalidInput(f"invalid hostname {hostname!r}: use DNS labels "
                           "(letters, digits, '-') separated by dots, at most 64 characters")
    return hostname
