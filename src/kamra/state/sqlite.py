"""SQLite state store (WAL): each write is one transaction, so a crash leaves old or new."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterable

from kamra.errors import AlreadyExists, Conflict
from kamra.state.base import ContainerRecord, Forward, StateStore

_SCHEMA = """
CREATE TABLE IF NOT EXISTS containers (
    name TEXT PRIMARY KEY,
    data TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS addresses (
    address TEXT PRIMARY KEY,
    container TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forwards (
    proto TEXT NOT NULL,
    host_ip TEXT NOT NULL,
    host_port INTEGER NOT NULL,
    container TEXT NOT NULL,
    ct_port INTEGER NOT NULL,
    PRIMARY KEY (proto, host_ip, host_port)
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

    def sync(self) -> None:
        # WAL with synchronous=NORMAL syncs the log only at checkpoints: force one.
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(FULL)")

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

    def allocate_address(self, container: str, candidates: Iterable[str],
                         wanted: str | None = None) -> str:
        with self._lock:
            # IMMEDIATE takes the write lock first: two processes allocating at once
            # serialize here instead of both reading the same free address.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                taken = dict(self._db.execute("SELECT address, container FROM addresses"))
                if wanted is not None:
                    holder = taken.get(wanted)
                    if holder is not None and holder != container:
                        raise Conflict(f"address {wanted} is already used by container "
                                       f"{holder!r}: choose another, or leave --ip out")
                    choice = wanted
                else:
                    choice = next((a for a in candidates if a not in taken), None)
                    if choice is None:
                        raise Conflict("the address pool is exhausted: every address is "
                                       "held by a container; destroy one or widen the pool")
                self._db.execute("INSERT OR REPLACE INTO addresses(address, container) "
                                 "VALUES (?, ?)", (choice, container))
                self._db.execute("COMMIT")
                return choice
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def release_addresses(self, container: str) -> None:
        with self._lock:
            self._db.execute("DELETE FROM addresses WHERE container = ?", (container,))

    def addresses(self) -> dict[str, str]:
        with self._lock:
            return dict(self._db.execute(
                "SELECT address, container FROM addresses ORDER BY container, address"))

    def add_forward(self, forward: Forward) -> None:
        with self._lock:
            # A forward on every address ("") and one on a single address overlap.
            row = self._db.execute(
                "SELECT container, ct_port, host_ip FROM forwards WHERE proto = ? AND "
                "host_port = ? AND (host_ip = ? OR host_ip = '' OR ? = '')",
                (forward.proto, forward.host_port, forward.host_ip,
                 forward.host_ip)).fetchone()
            if row is not None:
                where = f"{forward.host_ip or '*'}:{forward.host_port}/{forward.proto}"
                raise Conflict(f"host port {where} is already forwarded to container "
                               f"{row[0]!r} (port {row[1]}): choose another host port, or "
                               "remove that forward")
            try:
                self._db.execute(
                    "INSERT INTO forwards(proto, host_ip, host_port, container, ct_port) "
                    "VALUES (?, ?, ?, ?, ?)", (forward.proto, forward.host_ip,
                                               forward.host_port, forward.container,
                                               forward.ct_port))
            except sqlite3.IntegrityError:
                row = self._db.execute(
                    "SELECT container, ct_port FROM forwards WHERE proto = ? AND host_ip = ? "
                    "AND host_port = ?", (forward.proto, forward.host_ip,
                                          forward.host_port)).fetchone()
                where = f"{forward.host_ip or '*'}:{forward.host_port}/{forward.proto}"
                holder = f"container {row[0]!r} (port {row[1]})" if row else "another forward"
                raise Conflict(f"host port {where} is already forwarded to {holder}: "
                               "choose another host port, or remove that forward") from None

    def remove_forward(self, container: str, proto: str, host_port: int,
                       host_ip: str = "") -> bool:
        with self._lock:
            cursor = self._db.execute(
                "DELETE FROM forwards WHERE container = ? AND proto = ? AND host_port = ? "
                "AND host_ip = ?", (container, proto, host_port, host_ip))
            return cursor.rowcount > 0

    def forwards(self, container: str | None = None) -> list[Forward]:
        query = "SELECT container, proto, host_port, ct_port, host_ip FROM forwards"
        args: tuple = ()
        if container is not None:
            query += " WHERE container = ?"
            args = (container,)
        with self._lock:
            rows = self._db.execute(query + " ORDER BY host_port, proto", args).fetchall()
        return [Forward(*row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
