"""Undo the completed steps of a multi-step action when a later step fails (Incus's revert)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("kamra.engine")


class Revert:
    def __init__(self) -> None:
        self._undo: list[tuple[str, Callable[..., Any], tuple]] = []

    def add(self, what: str, func: Callable[..., Any], *args: Any) -> None:
        self._undo.append((what, func, args))

    def success(self) -> None:
        self._undo.clear()

    def __enter__(self) -> Revert:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        for what, func, args in reversed(self._undo):
            try:
                func(*args)
            except Exception as undo_exc:  # noqa: BLE001 - undo the rest regardless
                log.warning("undo %s failed: %s", what, undo_exc)
        self._undo.clear()
