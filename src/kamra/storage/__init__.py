"""Storage backends: how a container's root filesystem is made from its template."""

from __future__ import annotations

from kamra.errors import InvalidInput
from kamra.storage.base import StorageBackend
from kamra.storage.overlay import OverlayStorage

BACKENDS: dict[str, type[StorageBackend]] = {"overlay": OverlayStorage}


def get_backend(name: str, root: str) -> StorageBackend:
    try:
        cls = BACKENDS[name]
    except KeyError:
        raise InvalidInput(f"unknown storage backend {name!r}: use one of "
                           f"{', '.join(sorted(BACKENDS))}") from None
    return cls(root)


__all__ = ["BACKENDS", "StorageBackend", "get_backend"]
