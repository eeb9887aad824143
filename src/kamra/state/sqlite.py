"""SQLite state store (WAL): each write is one transaction, so a crash leaves old or new."""

from __future__ import annotations

import json
import sqlite3
import threading

from kamra.errors import AlreadyExists
from kamra.state.base import ContainerRecord, StateStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
"""


class SqliteStore(StateStore):
    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None,
                                   check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def insert(self, record: ContainerRecord) -> None:
        with self._lock:
            try:
                self._db.execute("INSERT INTO containers(name, data) VALUES (?, ?)",
                                 (record.name, json.dumps(record.to_json())))
            except sqlite3.IntegrityError:
                raise AlreadyExists(f"container {record.name!r} already exists") from None

    def update(self, record: ContainerRecord) -> None:
        with self._lock:
            self._db.execute("UPDATE containers SET data = ? WHERE name = ?",
                             (json.dumps(record.to_json()), record.name))

    def get(self, name: str) -> ContainerRecord | None:
        with self._lock:
            row = self._db.execute("SELECT data FROM containers WHERE name = ?",
                                   (name,)).fetchone()
        return ContainerRecord.from_json(json.loads(row[0])) if row else None

    def delete(self, name: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM containers WHERE name = ?", (name,))

    def list(self) -> list[ContainerRecord]:
        with self._lock:
            rows = self._db.execute("SELECT data FROM containers ORDER BY name").fetchall()
        return [ContainerRecord.from_json(json.loads(r[0])) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
