"""State stores: where container records live (SQLite now, etcd for clusters later)."""

from __future__ import annotations

from kamra.errors import InvalidInput
from kamra.state.base import ContainerRecord, StateStore
from kamra.state.sqlite import SqliteStore

STORES: dict[str, type[StateStore]] = {"sqlite": SqliteStore}


def open_store(kind: str, location: str) -> StateStore:
    try:
        cls = STORES[kind]
    except KeyError:
        raise InvalidInput(f"unknown state store {kind!r}: use one of {', '.join(STORES)}") from None
    return cls(location)


__all__ = ["ContainerRecord", "STORES", "StateStore", "open_store"]
