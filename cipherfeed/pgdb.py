"""A PostgreSQL database with the interface of ``sqlitedb.DurableDatabase``, for the key service's
and the ledger's server-database DSN (``postgresql://...``). SQL is written once, with ``?`` placeholders, and
translated here. Write transactions take a transaction-scoped advisory lock, so several key
service replicas on one database serialize their changes as SQLite's IMMEDIATE transactions do."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

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


class PostgresDatabase:
    def __init__(self, dsn: str, schema: str) -> None:
        import psycopg

        self.path = None  # not a file
        try:
            self._conn = psycopg.connect(dsn, autocommit=True, connect_timeout=10)
        except psycopg.OperationalError as exc:
            where = dsn.rsplit("@", 1)[-1]  # never echo a password
            raise ConnectionError(f"cannot reach the database at {where}: {str(exc).strip()[:200]}") from None
        self._lock = threading.RLock()
        with self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_ID,))  # so does creating the schema
            self._conn.execute(schema)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._conn.execute(_pg(sql), params).fetchall()

    @contextmanager
    def locked(self) -> Iterator[None]:
        with self._lock:
            yield

    @contextmanager
    def transaction(self) -> Iterator[_Tx]:
        with self._lock, self._conn.transaction():
            self._conn.execute("SELECT pg_advisory_xact_lock(%s)", (ADVISORY_LOCK_ID,))
            yield _Tx(self._conn)

    def try_session_lock(self, lock_id: int) -> bool:
        """Takes a session advisory lock (held until this connection closes, or its process dies)."""
        with self._lock:
            row = self._conn.execute("SELECT pg_try_advisory_lock(%s)", (lock_id,)).fetchone()
        return bool(row and row[0])

    def scrub(self, table: str) -> None:
        """Rewrites ``table`` so that deleted material does not linger in dead tuples."""
        if not table.isidentifier():
            raise ValueError("table names are identifiers")
        with self._lock:
            self._conn.execute(f"VACUUM FULL {table}")
