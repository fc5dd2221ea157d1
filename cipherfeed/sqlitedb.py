"""A durable SQLite database shared by the key service and the ledger: WAL journal,
synchronous=FULL (a committed transaction survives a crash), one connection behind a lock,
and IMMEDIATE transactions that roll back on any error. ``pgdb.PostgresDatabase`` offers the same
interface (``query``, ``transaction``, ``locked``, ``scrub``, ``close``) on a server database."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

DURABLE_PRAGMAS = ("journal_mode=WAL", "synchronous=FULL", "foreign_keys=ON")


class DurableDatabase:
    def __init__(self, path: Path, schema: str, extra_pragmas: tuple[str, ...] = ()) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._lock = threading.RLock()
        for pragma in (*DURABLE_PRAGMAS, *extra_pragmas):
            self._db.execute(f"PRAGMA {pragma}")
        self._db.executescript(schema)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """A read, outside any write transaction; ``?`` placeholders."""
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def scrub(self, table: str) -> None:
        """Deleted content is already zeroed where ``secure_delete`` is on."""

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Holds the lock every transaction takes, without a transaction (for ordered reads)."""
        with self._lock:
            yield

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
