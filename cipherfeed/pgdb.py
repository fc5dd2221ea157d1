"""A PostgreSQL database with the interface of ``sqlitedb.DurableDatabase``, for the key service's
and the ledger's server-database DSN (``postgresql://...``). SQL is written once, with ``?`` placeholders, and
translated here. Write transactions take a transaction-scoped advisory lock, so several key
service replicas on one database serialize their changes as SQLite's IMMEDIATE transactions do.

The connection is reopened after the server restarted or the network dropped it: a call that finds
it broken fails as UNAVAILABLE (``errors.Unavailable``: the caller retries; a transaction whose
COMMIT was cut off may or may not have committed, and the callers' writes are idempotent or
re-read what is stored), and the next call connects again. A read is retried once at once on the
new connection. Session advisory locks are taken again on the new connection; if another process
took one meanwhile, every call fails until this process is restarted (a ledger that lost its
one-writer lock must not write)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cipherfeed.errors import Unavailable

log = logging.getLogger(__name__)
ADVISORY_LOCK_ID = 0x63667470  # "cftp"


def _pg(sql: str) -> str:
    return sql.replace("?", "%s")


class _Tx:
    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def execute(self, sql: str, params: tuple = ()) -> Any:
        return self._conn.execute(_pg(sql), params)

    def executemany(self, sql: str, rows: list[tuple]) -> None:
        with self._conn.cursor() as cursor:
            cursor.executemany(_pg(sql), rows)


def _unreachable(dsn: str, exc: Exception) -> Unavailable:
    where = dsn.rsplit("@", 1)[-1]  # never echo a password
    return Unavailable(
        f"cannot reach the database at {where}: {str(exc).strip()[:200]}", metadata={"dependency": "database"}
    )


class PostgresDatabase:
    def __init__(self, dsn: str, schema: str) -> None:
        import psycopg

        self._psycopg = psycopg
        self.path = None  # not a file
        self._dsn = dsn
        self._session_locks: set[int] = set()
        self._lost_lock: int | None = None
        self._lock = threading.RLock()
        try:
            self._conn = self._connect()
        except Unavailable as exc:
            raise ConnectionError(exc.message) from None
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_ID,))  # so does creating the schema
            self._conn.execute(schema)

    def _connect(self) -> Any:
        try:
            return self._psycopg.connect(self._dsn, autocommit=True, connect_timeout=10)
        except self._psycopg.OperationalError as exc:
            raise _unreachable(self._dsn, exc) from None

    def _usable(self) -> Any:
        """The connection, opened again (with this process's session locks) if it was lost."""
        if self._lost_lock is not None:
            raise RuntimeError(f"advisory lock {self._lost_lock:#x} was taken by another process while disconnected")
        if not (self._conn.closed or self._conn.broken):
            return self._conn
        conn = self._connect()
        for lock_id in sorted(self._session_locks):
            row = conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,)).fetchone()
            if not (row and row[0]):
                conn.close()
                self._lost_lock = lock_id
                raise RuntimeError(f"advisory lock {lock_id:#x} was taken by another process while disconnected")
        log.warning("reconnected to the database at %s", self._dsn.rsplit("@", 1)[-1])
        self._conn = conn
        return conn

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            for attempt in (0, 1):
                conn = self._usable()
                try:
                    return conn.execute(_pg(sql), params).fetchall()
                except self._psycopg.OperationalError as exc:
                    if attempt or not (conn.closed or conn.broken):
                        raise _unreachable(self._dsn, exc) from None
        raise AssertionError("unreachable")

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            yield

    @contextmanager
    def transaction(self) -> Iterator[_Tx]:
        with self._lock:
            conn = self._usable()
            try:
                with conn.transaction():
                    conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_ID,))
                    yield _Tx(conn)
            except self._psycopg.OperationalError as exc:
                raise _unreachable(self._dsn, exc) from None

    def try_session_lock(self, lock_id: int) -> bool:
        """Takes a session advisory lock (held until this connection closes, or its process dies;
        taken again when the connection is reopened)."""
        with self._lock:
            row = self._usable().execute("SELECT pg_try_advisory_lock(%s)", (lock_id,)).fetchone()
        held = bool(row and row[0])
        if held:
            self._session_locks.add(lock_id)
        return held

    def scrub(self, table: str) -> None:
        """Rewrites ``table`` so that deleted material does not linger in dead tuples."""
        if not table.isidentifier():
            raise ValueError("table names are identifiers")
        with self._lock:
            self._usable().execute(f"VACUUM FULL {table}")
